"""Listing a folder's files to classify, and naming them safely (standard library only)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
           (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def image_files(folder: str | Path) -> list[Path]:
    """Every entry of `folder` but sub-folders and hidden files (not recursive), sorted by
    name. Non-image files, pipes, devices and broken links are listed too, so the user sees
    why they were not classified (`not_readable` says why, without opening them)."""
    return sorted((p for p in Path(folder).iterdir() if not p.name.startswith(".")
                   and not p.is_dir()), key=lambda p: p.name.lower())


def not_readable(path: str | Path) -> str | None:
    """Why `path` must not be opened as an image file (reading a pipe or a device would block
    or never end), or None for a regular file. Links are followed."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "skipped: a broken link" if os.path.islink(path) else "file not found"
    except OSError as exc:
        return f"skipped: cannot be read ({exc.strerror})"
    for test, kind in SPECIAL:
        if test(mode):
            return f"skipped: {kind}, not a file; it was not read"
    if stat.S_ISDIR(mode):
        return "skipped: a folder, not an image file; it was not read"
    return None


def display_name(text: str | os.PathLike) -> str:
    """A file name as text that can always be printed and saved: bytes that are not UTF-8
    (kept by Python as surrogate escapes) are shown as \\xNN."""
    return os.fsencode(os.fspath(text)).decode("utf-8", "backslashreplace")


def cache_folder() -> Path:
    """The app's own files: the user's cache, never a folder of theirs."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarlab"


def pasted_folder() -> Path:
    """Where the app keeps images pasted from the clipboard (they need a file to be classified
    and exported like the others)."""
    return cache_folder() / "pasted"
