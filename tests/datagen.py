"""Tiny generated datasets in both on-disk forms the project reads."""
from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["cat", "dog", "ship"]


def class_images(n_per_class: int, size: int = 32, classes=CLASSES, seed: int = 0):
    """Learnable images: each class a distinct colour pattern plus noise."""
    rng = np.random.default_rng(seed)
    for label, _ in enumerate(classes):
        base = np.zeros((size, size, 3), dtype=np.float64)
        base[..., label % 3] = 180
        base[: size // 2, :, (label + 1) % 3] = 90 * (label + 1) % 255
        for _ in range(n_per_class):
            noise = rng.normal(0, 30, base.shape)
            yield label, np.clip(base + noise, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, n_train: int = 20, n_test: int = 6, size: int = 32,
                      classes=CLASSES) -> Path:
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        counts = {}
        for label, arr in class_images(n, size, classes, seed):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            i = counts[label] = counts.get(label, -1) + 1
            Image.fromarray(arr).save(folder / f"{i:04d}.png")
    return root


def make_cifar_archive(folder: Path, n_train_per_batch: int = 6, n_test: int = 12):
    """A miniature cifar-10-python.tar.gz in torchvision's format, with the md5 sums that
    torchvision must be told: (archive path, train_list, test_list, archive md5)."""
    classes = [f"class{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    src = folder / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)

    def batch(name: str, n: int) -> None:
        labels = [i % 10 for i in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(src / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)

    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name in names:
        batch(name, n_train_per_batch)
    batch("test_batch", n_test)
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes}, f)

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    train_list = [[n, md5(src / n)] for n in names]
    test_list = [["test_batch", md5(src / "test_batch")]]
    meta = {"filename": "batches.meta", "key": "label_names", "md5": md5(src / "batches.meta")}
    return archive, train_list, test_list, meta, md5(archive)


def make_odd_images(folder: Path) -> dict[str, str | None]:
    """One file per awkward case. Returns file name -> expected error substring (None: readable)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "plain.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    rgba = np.dstack([rgb, np.full((40, 60), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show upright
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (3000, 1000), (10, 200, 30)).save(folder / "huge.png")
    (folder / "notes.txt").write_text("not an image")
    whole = (folder / "plain.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    return {"plain.png": None, "gray.png": None, "alpha.png": None, "palette.png": None,
            "sixteen.png": None, "cmyk.jpg": None, "rotated.jpg": None,
            "huge.png": "megapixel limit", "notes.txt": "not an image",
            "truncated.png": "truncated", "empty.jpg": "not an image"}


def make_class_folders(root: Path, n_per_class: int = 12, size: int = 32, classes=CLASSES,
                       ext: str = "png") -> Path:
    """ROOT/<class>/* with no split: torchvision's ImageFolder layout."""
    counts: dict[int, int] = {}
    for label, arr in class_images(n_per_class, size, classes):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        i = counts[label] = counts.get(label, -1) + 1
        Image.fromarray(arr).save(folder / f"{classes[label]}_{i:03d}.{ext}")
    return root


def make_labels_file_dataset(root: Path, n_per_class: int = 12, classes=CLASSES,
                             labels_name: str = "trainLabels.csv", n_unlabelled_test: int = 4) -> Path:
    """Kaggle's CIFAR-10 layout: ROOT/train/1.png ... with ROOT/trainLabels.csv of id,label,
    and an unlabelled ROOT/test/."""
    (root / "train").mkdir(parents=True)
    rows = ["id,label"]
    for i, (label, arr) in enumerate(class_images(n_per_class, 32, classes), start=1):
        Image.fromarray(arr).save(root / "train" / f"{i}.png")
        rows.append(f"{i},{classes[label]}")
    (root / labels_name).write_text("\n".join(rows) + "\n")
    (root / "test").mkdir()
    for i, (_, arr) in enumerate(class_images(1, 32, classes, seed=5), start=1):
        if i <= n_unlabelled_test:
            Image.fromarray(arr).save(root / "test" / f"{i}.png")
    return root
