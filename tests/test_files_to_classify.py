"""Whatever a folder holds, every entry gets its CSV row: names that are not UTF-8, names that
a spreadsheet would run as formulas, pipes and devices (never read), images of odd shapes
(decoded in little memory)."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gui.classify import main
from gui.export import cell

NOT_UTF8 = os.fsdecode(b"caf\xe9.png")


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def odd_names(image_folder, tmp_path):
    folder = tmp_path / "odd-names"
    folder.mkdir()
    cat = next((image_folder / "test" / "cat").iterdir())
    for name in (NOT_UTF8, "=HYPERLINK(1).png", "+1.png", "-2.png", "@sum.png", "plain.png"):
        shutil.copy(cat, folder / name)
    return folder


def test_a_name_that_is_not_utf8_gets_its_row_in_the_csv(odd_names, registered_store, tmp_path):
    out = tmp_path / "out.csv"
    assert main([str(odd_names), "--tracking-uri", registered_store, "--csv", str(out)]) == 0
    names = {Path(r["file"]).name: r for r in rows(out)}
    assert len(names) == 6
    assert names["caf\\xe9.png"]["predicted_class"] in {"cat", "dog", "ship"}


def test_every_row_reaches_standard_output_too(odd_names, registered_store, capsys):
    assert main([str(odd_names), "--tracking-uri", registered_store]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and any("caf\\xe9.png" in line for line in lines)


@pytest.mark.parametrize("text", ["=HYPERLINK(1)", "+1", "-2", "@sum", "\tx"])
def test_a_cell_that_would_start_a_formula_is_escaped(text):
    assert cell(text) == "'" + text


def test_file_paths_starting_a_formula_are_escaped_in_the_csv(odd_names, registered_store,
                                                              tmp_path):
    out = tmp_path / "out.csv"
    assert main([str(odd_names), "--tracking-uri", registered_store, "--csv", str(out)]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        cells = [c for row in csv.reader(f) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@")]


@pytest.fixture
def special_entries(image_folder, tmp_path):
    folder = tmp_path / "special"
    folder.mkdir()
    shutil.copy(next((image_folder / "test" / "cat").iterdir()), folder / "real.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    return folder


def test_pipes_devices_and_broken_links_are_listed_as_skipped_without_reading(
        special_entries, registered_store, tmp_path):
    out = tmp_path / "out.csv"
    code = subprocess.run([sys.executable, "-m", "gui.classify", str(special_entries),
                           "--tracking-uri", registered_store, "--csv", str(out)],
                          timeout=120, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent).returncode
    assert code == 0
    errors = {Path(r["file"]).name: r["error"] for r in rows(out)}
    assert errors["real.png"] == ""
    assert "named pipe" in errors["pipe.png"] and "not read" in errors["pipe.png"]
    assert "character device" in errors["zero.png"]
    assert "broken link" in errors["gone.png"]


def test_a_thin_image_is_decoded_in_little_memory(tmp_path):
    """A 1 x 1,000,000 PNG (a few KB) once took 1.5 GB: resized whole before cropping."""
    path = tmp_path / "thin.png"
    Image.new("RGB", (1, 1_000_000), (200, 10, 10)).save(path)
    script = ("import resource, sys; from shared.preprocess import decode_image; "
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
              "image = decode_image(sys.argv[1], 32); "
              "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
              "print(image.shape, (after - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parent.parent, check=True).stdout.split()
    assert out[:3] == ["(3,", "32,", "32)"]
    assert int(out[3]) < 64  # megabytes more than the process held before decoding


def test_the_app_lists_every_entry_and_never_blocks_on_a_pipe(
        special_entries, odd_names, registered_store, qtbot, tmp_path):
    from PySide6.QtCore import QSettings

    from gui.main_window import MainWindow

    for entry in odd_names.iterdir():
        shutil.copy(entry, special_entries / entry.name)
    window = MainWindow(registered_store, QSettings(str(tmp_path / "s.ini"),
                                                    QSettings.Format.IniFormat), special_entries)
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: not window.running and len(window.images.predictions()) == 10,
                    timeout=30_000)
    window.export_csv(tmp_path / "app.csv")
    errors = {Path(r["file"]).name: r["error"] for r in rows(tmp_path / "app.csv")}
    assert len(errors) == 10 and "named pipe" in errors["pipe.png"]
    assert errors["caf\\xe9.png"] == ""
    window.close()
