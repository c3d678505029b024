"""The list of images on screen, with each one's thumbnail and prediction."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QAbstractListModel, QModelIndex, QPersistentModelIndex, Qt
from PySide6.QtGui import QColor, QImage, QPixmap

from shared.files import display_name

if TYPE_CHECKING:
    from shared.inference import Prediction

ItemRole = Qt.ItemDataRole.UserRole + 1


@dataclass
class ImageItem:
    path: str
    thumbnail: QPixmap | None = None
    prediction: Prediction | None = None
    display_error: str | None = None  # the thumbnail could not be decoded

    @property
    def caption(self) -> str:
        name = display_name(Path(self.path).name)
        if self.prediction is None:
            return name
        if self.prediction.error:
            return f"⚠ {self.prediction.error}\n{name}"
        unsure = " (unsure)" if self.prediction.unsure else ""
        return f"{self.prediction.label} {self.prediction.confidence:.0%}{unsure}\n{name}"


class ImageListModel(QAbstractListModel):
    def __init__(self, thumbnail_size: int, parent=None):
        super().__init__(parent)
        self.items: list[ImageItem] = []
        self._rows: dict[str, int] = {}
        self.placeholder = QPixmap(thumbnail_size, thumbnail_size)
        self.placeholder.fill(QColor("gainsboro"))

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.items)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or not 0 <= index.row() < len(self.items):
            return None
        item = self.items[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return item.caption
        if role == Qt.ItemDataRole.DecorationRole:
            return item.thumbnail or self.placeholder
        if role == Qt.ItemDataRole.ToolTipRole:
            notes = [item.prediction.error if item.prediction else None, item.display_error and
                     f"thumbnail {item.display_error}"]
            return "\n".join([display_name(item.path), *filter(None, notes)])
        if role == Qt.ItemDataRole.ForegroundRole and item.prediction and item.prediction.error:
            return QColor("darkred")
        if role == ItemRole:
            return item
        return None

    def set_paths(self, paths: list[str]) -> None:
        self.beginResetModel()
        self.items = [ImageItem(p) for p in dict.fromkeys(paths)]
        self._rows = {item.path: i for i, item in enumerate(self.items)}
        self.endResetModel()

    def add_paths(self, paths: list[str]) -> list[str]:
        """Append the paths not listed yet; returns them."""
        new = [p for p in dict.fromkeys(paths) if p not in self._rows]
        if new:
            self.beginInsertRows(QModelIndex(), len(self.items), len(self.items) + len(new) - 1)
            for p in new:
                self._rows[p] = len(self.items)
                self.items.append(ImageItem(p))
            self.endInsertRows()
        return new

    def paths(self) -> list[str]:
        return [item.path for item in self.items]

    def set_thumbnail(self, path: str, image: QImage) -> None:
        self._update(path, thumbnail=QPixmap.fromImage(image))

    def set_display_error(self, path: str, message: str) -> None:
        self._update(path, display_error=message)

    def set_prediction(self, prediction: Prediction) -> None:
        self._update(prediction.path, prediction=prediction)

    def clear_predictions(self) -> None:
        for item in self.items:
            item.prediction = None
        if self.items:
            self.dataChanged.emit(self.index(0), self.index(len(self.items) - 1))

    def predictions(self) -> list[Prediction]:
        return [item.prediction for item in self.items if item.prediction is not None]

    def _update(self, path: str, **changes) -> None:
        row = self._rows.get(path)
        if row is None:
            return
        for key, value in changes.items():
            setattr(self.items[row], key, value)
        self.dataChanged.emit(self.index(row), self.index(row))
