"""Listing the files to classify (standard library only)."""
from __future__ import annotations

from pathlib import Path


def image_files(folder: str | Path) -> list[Path]:
    """Every file in `folder` (not recursive, hidden files skipped), sorted by name. Non-image
    files are listed too, so the user sees why they were not classified."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")),
                  key=lambda p: p.name.lower())
