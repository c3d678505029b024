"""Loss and accuracy per epoch, drawn as they arrive (two small panels, QPainter only)."""
from __future__ import annotations

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPen
from PySide6.QtWidgets import QWidget

SERIES = {  # panel -> (metric, colour, legend)
    "loss": (("train_loss", "#1f77b4", "train"), ("val_loss", "#ff7f0e", "validation")),
    "accuracy": (("train_acc", "#1f77b4", "train"), ("val_acc", "#ff7f0e", "validation")),
}


class Curves(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.history: list[dict[str, float]] = []
        self.epochs = 0
        self.setMinimumHeight(170)

    def clear(self, epochs: int = 0) -> None:
        self.history, self.epochs = [], epochs
        self.update()

    def add(self, metrics: dict[str, float], epochs: int) -> None:
        self.history.append(metrics)
        self.epochs = max(epochs, len(self.history))
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        half = self.width() / 2
        for i, (title, series) in enumerate(SERIES.items()):
            self._panel(painter, QRectF(i * half + 6, 4, half - 12, self.height() - 8), title, series)
        painter.end()

    def _panel(self, painter: QPainter, box: QRectF, title: str, series) -> None:
        text = self.fontMetrics().height()
        plot = box.adjusted(34, text + 4, -4, -text - 2)
        painter.setPen(self.palette().text().color())
        painter.drawText(box.adjusted(0, 0, 0, 0), Qt.AlignmentFlag.AlignHCenter, title)
        painter.drawRect(plot)
        values = [m[key] for m in self.history for key, _, _ in series if key in m]
        if not values:
            painter.drawText(plot, Qt.AlignmentFlag.AlignCenter, "per epoch, as it trains")
            return
        low, high = (0.0, 1.0) if title == "accuracy" else (0.0, max(values) * 1.05 or 1.0)
        painter.drawText(QRectF(box.left(), plot.top() - text / 2, 32, text),
                         Qt.AlignmentFlag.AlignRight, f"{high:.2g}")
        painter.drawText(QRectF(box.left(), plot.bottom() - text / 2, 32, text),
                         Qt.AlignmentFlag.AlignRight, f"{low:.2g}")
        painter.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), text),
                         Qt.AlignmentFlag.AlignHCenter, f"epoch {len(self.history)} of {self.epochs}")
        steps = max(self.epochs - 1, 1)
        for n, (key, colour, legend) in enumerate(series):
            points = [QPointF(plot.left() + plot.width() * e / steps,
                              plot.bottom() - plot.height() * (m[key] - low) / (high - low))
                      for e, m in enumerate(self.history) if key in m]
            if not points:
                continue
            painter.setPen(QPen(QColor(colour), 2))
            painter.drawPolyline(points)
            for point in points:
                painter.drawEllipse(point, 2, 2)
            painter.drawText(QPointF(plot.right() - 90, plot.top() + text * (n + 1)), legend)
