"""What the app may change in a user's training folder: copies that never overwrite, undo that
removes only its own copy, and label decisions checked in full before any file moves."""
import shutil
from pathlib import Path

import pytest

from shared import curation
from shared.curation import CurationError, Decision


@pytest.fixture
def folder(image_folder, tmp_path) -> Path:
    return Path(shutil.copytree(image_folder, tmp_path / "pets"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_correction_never_overwrites_and_undo_removes_only_its_copy(folder):
    before = snapshot(folder)
    photo = folder / "test" / "cat" / "0000.png"
    first = curation.add_to_class(photo, folder, "dog")
    second = curation.add_to_class(photo, folder, "dog")
    assert first.copy.name == "0000-2.png" and second.copy.name == "0000-3.png"
    assert snapshot(folder)["train/dog/0000.png"] == before["train/dog/0000.png"]
    curation.undo(second)
    curation.undo(first)
    assert snapshot(folder) == before


def test_a_new_class_folder_is_made_and_removed_again_by_undo(folder):
    correction = curation.add_to_class(folder / "test" / "cat" / "0000.png", folder, "horse")
    assert correction.copy == folder / "train" / "horse" / "0000.png"
    curation.undo(correction)
    assert not (folder / "train" / "horse").exists()


@pytest.mark.parametrize("name", ["", "  ", "../escape", "a/b", ".hidden", ".."])
def test_a_bad_class_name_is_refused_and_nothing_is_made(folder, name):
    before = snapshot(folder)
    with pytest.raises(CurationError, match="cannot be a class name"):
        curation.add_to_class(folder / "test" / "cat" / "0000.png", folder, name)
    assert snapshot(folder) == before and not (folder.parent / "escape").exists()


def test_a_missing_training_folder_is_named(folder, tmp_path):
    with pytest.raises(CurationError, match="does not exist: choose it again"):
        curation.add_to_class(folder / "test" / "cat" / "0000.png", tmp_path / "gone", "cat")


def test_decisions_are_all_checked_before_any_file_moves(folder):
    before = snapshot(folder)
    decisions = [Decision("train/cat/0000.png", "cat", "exclude"),
                 Decision("train/cat/0099.png", "cat", "relabel", "dog")]
    with pytest.raises(CurationError, match="0099.png is no longer in"):
        curation.apply(folder, decisions)
    assert snapshot(folder) == before and not curation.excluded_folder(folder).exists()
    assert not curation.decisions_log(folder).exists()


def test_relabel_copies_to_the_new_class_and_moves_the_original_aside(folder):
    before = snapshot(folder)
    rows = curation.apply(folder, [Decision("train/cat/0001.png", "cat", "relabel", "dog"),
                                   Decision("train/cat/0002.png", "cat", "keep"),
                                   Decision("train/dog/0003.png", "dog", "exclude")])
    after = snapshot(folder)
    assert rows[0]["copied_to"] == "train/dog/0001-2.png"  # train/dog/0001.png was taken
    assert after["train/dog/0001-2.png"] == before["train/cat/0001.png"]
    assert set(before) - set(after) == {"train/cat/0001.png", "train/dog/0003.png"}
    aside = curation.excluded_folder(folder)
    assert aside == folder.parent / "excluded" / "pets"
    assert (aside / "train/dog/0003.png").read_bytes() == before["train/dog/0003.png"]
    assert len(curation.decisions_log(folder).read_text().splitlines()) == 4


def test_relabelling_a_file_not_in_its_class_folder_is_refused(folder):
    with pytest.raises(CurationError, match="relabel it in your labels file"):
        curation.apply(folder, [Decision("train/cat/0001.png", "dog", "relabel", "cat")])
