"""Every folder layout a person's photos come in, and every bad case, on generated folders."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.engine.build import check_skipped, image_size_for, loss_for, prepare
from training.engine.config import resolve
from training.engine.data import channel_stats, load_dataset, pack_rows, train_then_val
from training.engine.layouts import DatasetError, Source, find_layout
from training.engine.models import get_spec
from training.train import main

from datagen import CLASSES, make_class_folders, make_image_folder, make_labels_file_dataset


def quiet(*_):
    pass


def listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def config(data_dir, tmp_path, **overrides):
    settings = dict(model="cnn", data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"),
                    epochs=1, batch_size=8, device="cpu", progress=False, val_fraction=0.2)
    return resolve({**settings, **overrides})


# --- each layout ---------------------------------------------------------------------------

def test_class_folders_with_no_split_get_a_stratified_test_split(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=20)
    data = load_dataset(root, cache_dir=None, log=quiet)
    assert data.layout == "class-folders" and data.classes == sorted(CLASSES)
    assert torch.bincount(data.test_labels).tolist() == [2, 2, 2]
    assert torch.bincount(data.train_labels).tolist() == [18, 18, 18]
    assert set(data.files["train"]).isdisjoint(data.files["test"])
    assert all(name.count("/") == 1 for name in data.files["test"])


def test_the_held_out_test_split_is_fixed_by_the_file_names_alone(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=20)
    first = load_dataset(root, cache_dir=None, log=quiet).files["test"]
    assert load_dataset(root, cache_dir=None, log=quiet).files["test"] == first
    arr = np.zeros((32, 32, 3), np.uint8)
    Image.fromarray(arr).save(root / "cat" / "zz_new.png")
    again = load_dataset(root, cache_dir=None, log=quiet).files["test"]
    assert set(first) - set(again) <= {n for n in first if n.startswith("cat/")}
    assert [n for n in again if not n.startswith("cat/")] == [n for n in first if not n.startswith("cat/")]


def test_the_test_fraction_sets_the_share_held_out(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=20)
    data = load_dataset(root, cache_dir=None, log=quiet, test_fraction=0.25)
    assert torch.bincount(data.test_labels).tolist() == [5, 5, 5]


def test_the_validation_split_of_class_folders_is_stratified_and_the_same_for_every_seed(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=20)
    a = prepare(config(root, tmp_path, seed=1), log=quiet)
    b = prepare(config(root, tmp_path, seed=7), log=quiet)
    assert a.files["val"] == b.files["val"]
    assert torch.bincount(a.val[1]).tolist() == [4, 4, 4]
    assert set(a.files["val"]).isdisjoint(a.files["train"])
    assert set(a.files["test"]).isdisjoint(a.files["train"] + a.files["val"])


def test_the_split_rows_are_the_named_files(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=10)
    splits = prepare(config(root, tmp_path), log=quiet)
    for split, (images, labels) in (("train", splits.train), ("val", splits.val)):
        for row, name in [(0, splits.files[split][0]), (-1, splits.files[split][-1])]:
            from shared.preprocess import decode_image
            expected = decode_image(root / name, splits.data.image_size)
            assert np.array_equal(images[row].numpy(), expected)
            assert splits.data.classes[int(labels[row])] == name.split("/")[0]


def test_a_given_val_folder_is_used_as_it_is(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=6, n_test=2)
    shutil.copytree(root / "test", root / "valid")
    splits = prepare(config(root, tmp_path), log=quiet)
    assert splits.data.layout == "split-folders" and splits.val_source.startswith("given")
    assert len(splits.val[1]) == 6 and len(splits.train[1]) == 18
    assert all(name.startswith("valid/") for name in splits.files["val"])


def test_kaggle_train_labels_csv_beside_train_is_found_by_itself(tmp_path):
    root = make_labels_file_dataset(tmp_path / "kaggle", n_per_class=10)
    data = load_dataset(root, cache_dir=None, log=quiet)
    assert data.layout == "labels-file" and data.classes == sorted(CLASSES)
    assert len(data.train_labels) + len(data.test_labels) == 30
    assert torch.bincount(data.test_labels).tolist() == [1, 1, 1]
    assert all(name.startswith("train/") for name in data.files["train"] + data.files["test"])


def test_a_labels_file_elsewhere_is_named_with_labels(tmp_path):
    root = make_labels_file_dataset(tmp_path / "k", n_per_class=6, labels_name="x.csv")
    moved = tmp_path / "my_labels.csv"
    (root / "x.csv").rename(moved)
    with pytest.raises(DatasetError, match="no labels file"):
        load_dataset(root, cache_dir=None, log=quiet)
    data = load_dataset(root, cache_dir=None, log=quiet, labels=moved)
    assert data.layout == "labels-file" and len(data.classes) == 3


def test_ids_may_carry_their_extension_and_unlabelled_images_are_noted(tmp_path):
    root = make_labels_file_dataset(tmp_path / "k", n_per_class=6)
    rows = (root / "trainLabels.csv").read_text().splitlines()
    kept = [rows[0]] + [f"{r.split(',')[0]}.png,{r.split(',')[1]}" for r in rows[1:-1]]
    (root / "trainLabels.csv").write_text("\n".join(kept))
    notes = []
    data = load_dataset(root, cache_dir=None, log=notes.append)
    assert len(data.train_labels) + len(data.test_labels) == 17
    assert any("1 image(s)" in n and "no row" in n for n in notes)


def test_cifar10_in_torchvision_form_is_still_read(cifar_mirror, tmp_path):
    data = load_dataset(tmp_path / "data", cache_dir=None, log=quiet)
    assert data.layout == "torchvision" and data.image_size == 32


# --- bad layouts and labels ----------------------------------------------------------------

def test_a_folder_of_non_images_is_refused_naming_it_and_nothing_is_written(tmp_path, capsys):
    root = tmp_path / "notes"
    (root / "drafts").mkdir(parents=True)
    (root / "drafts" / "a.txt").write_text("x")
    (root / "readme.md").write_text("x")
    before = listing(root)
    code = main(["--data-dir", str(root), "--cache-dir", str(tmp_path / "c"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "readme.md" in err and "class-folders" in err and "labels-file" in err
    assert "Nothing was written" in err
    assert listing(root) == before and not (root / "cifar-10-batches-py").exists()


def test_loose_images_with_no_class_folders_are_refused(tmp_path):
    root = tmp_path / "loose"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    with pytest.raises(DatasetError, match="1 image.*no class folders"):
        find_layout(Source(root))


def test_a_sub_folder_of_non_images_and_hidden_files_are_not_classes(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=6)
    (root / "docs").mkdir()
    (root / "docs" / "notes.txt").write_text("x")
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbnails" / "t.png")
    Image.new("RGB", (8, 8)).save(root / "cat" / ".hidden.png")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    data = load_dataset(root, cache_dir=None, log=quiet)
    assert data.classes == sorted(CLASSES) and data.listed == 18 and not data.skipped


def test_a_class_with_a_single_image_is_named(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=6)
    (root / "emu").mkdir()
    Image.new("RGB", (32, 32)).save(root / "emu" / "only.png")
    with pytest.raises(DatasetError, match=r"emu \(1\)"):
        find_layout(Source(root))


def test_a_class_too_small_for_a_validation_split_is_named(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=6)
    (root / "emu").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(root / "emu" / f"{i}.png")
    with pytest.raises(DatasetError, match=r"emu \(1 training image"):
        prepare(config(root, tmp_path), log=quiet)


def test_a_single_class_folder_is_refused(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=4, classes=["cat"])
    with pytest.raises(DatasetError, match="one class folder"):
        find_layout(Source(root))


def test_a_labels_file_naming_missing_files_names_them_and_the_empty_class(tmp_path):
    root = make_labels_file_dataset(tmp_path / "k", n_per_class=4)
    with open(root / "trainLabels.csv", "a") as f:
        f.write("9001,frog\n9002,frog\n")
    with pytest.raises(DatasetError) as err:
        find_layout(Source(root))
    assert "9001" in str(err.value) and "9002" in str(err.value)
    assert "no images: frog" in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("id,label\n1,cat\n1,dog\n", "labelled both"),
    ("id,label\n1\n", "row 2"),
    ("id,label\n", "no rows"),
    ("id,label\n1,cat\n2,cat\n", "at least 2"),
])
def test_a_bad_labels_file_is_refused_with_its_row(tmp_path, text, expected):
    root = make_labels_file_dataset(tmp_path / "k", n_per_class=2)
    (root / "trainLabels.csv").write_text(text)
    with pytest.raises(DatasetError, match=expected):
        find_layout(Source(root))


def test_a_labels_file_that_is_not_utf8_is_refused(tmp_path):
    root = make_labels_file_dataset(tmp_path / "k", n_per_class=2)
    (root / "trainLabels.csv").write_bytes(b"id,label\n1,caf\xe9\n")
    with pytest.raises(DatasetError, match="UTF-8"):
        find_layout(Source(root))


def test_split_folders_without_test_say_how_to_have_one_held_out(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=2, n_test=1)
    shutil.rmtree(root / "test")
    with pytest.raises(DatasetError, match="no test/ folder.*held out"):
        find_layout(Source(root))


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="macOS refuses non-UTF-8 names")
def test_file_names_that_are_not_utf8_are_read_and_listed_printably(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=6)
    odd = os.fsdecode(b"caf\xe9.png")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(root / "cat" / odd)
    data = load_dataset(root, cache_dir=tmp_path / "c", log=quiet)
    names = data.files["train"] + data.files["test"]
    assert len(names) == 19 and not data.skipped
    assert any("caf" in n and "\\xe9" in n for n in names)
    "".join(names).encode("utf-8")


# --- unreadable files and duplicates -------------------------------------------------------

def test_unreadable_files_are_skipped_and_listed_with_why(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=20)
    whole = (root / "dog" / "dog_000.png").read_bytes()
    (root / "dog" / "dog_000.png").write_bytes(whole[: len(whole) // 2])
    (root / "cat" / "cat_005.png").write_bytes(b"")
    before = listing(root)
    data = load_dataset(root, cache_dir=tmp_path / "c", log=quiet)
    assert sorted(name for name, _ in data.skipped) == ["cat/cat_005.png", "dog/dog_000.png"]
    assert data.listed == 60 and len(data.train_labels) + len(data.test_labels) == 58
    assert listing(root) == before
    messages = []
    check_skipped(data, 0.05, messages.append)
    assert "skipped 2" in messages[0] and "dog/dog_000.png" in messages[0]
    cached = load_dataset(root, cache_dir=tmp_path / "c", log=quiet)
    assert cached.skipped == data.skipped


def test_more_unreadable_files_than_allowed_stop_with_the_list(tmp_path, capsys):
    root = make_class_folders(tmp_path / "photos", n_per_class=6)
    for name in ("cat/cat_000.png", "dog/dog_001.png"):
        (root / name).write_bytes(b"not a png")
    before = listing(root)
    code = main(["--data-dir", str(root), "--cache-dir", str(tmp_path / "c"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "2 of the 18" in err and "cat/cat_000.png" in err and "--max-skipped" in err
    assert listing(root) == before


def test_the_same_image_under_two_classes_is_reported(tmp_path):
    root = make_class_folders(tmp_path / "photos", n_per_class=6)
    shutil.copy(root / "cat" / "cat_001.png", root / "dog" / "copy.png")
    data = load_dataset(root, cache_dir=None, log=quiet)
    assert len(data.duplicates) == 1
    assert "two classes" in data.duplicates[0] and "dog/copy.png" in data.duplicates[0]


# --- the image size follows the model ------------------------------------------------------

@pytest.mark.parametrize("model, side, expected", [
    ("cnn", 100, 64), ("cnn", 40, 40), ("alexnet", 300, 224), ("alexnet", 100, 100),
])
def test_the_stored_size_follows_the_model_and_the_photos(tmp_path, model, side, expected):
    root = make_class_folders(tmp_path / "p", n_per_class=3, size=side)
    found = find_layout(Source(root))
    size, reason = image_size_for(config(root, tmp_path, model=model), get_spec(model), found)
    assert size == expected and f"{side} px" in reason


def test_the_median_not_the_first_file_sets_the_size(tmp_path):
    root = make_class_folders(tmp_path / "p", n_per_class=4, size=48)
    Image.new("RGB", (20, 20)).save(root / "cat" / "aaa_first.png")
    found = find_layout(Source(root))
    assert image_size_for(config(root, tmp_path), get_spec("cnn"), found)[0] == 48


def test_an_image_size_flag_wins(tmp_path):
    root = make_class_folders(tmp_path / "p", n_per_class=3, size=48)
    cfg = config(root, tmp_path, image_size=24)
    assert image_size_for(cfg, get_spec("cnn"), find_layout(Source(root))) == (24, "--image-size")


# --- imbalanced classes --------------------------------------------------------------------

def test_balanced_class_weights_are_inverse_to_the_counts(tmp_path):
    root = make_class_folders(tmp_path / "p", n_per_class=10)
    for i in range(6):
        (root / "ship" / f"ship_{i:03d}.png").unlink()
    cfg = config(root, tmp_path, class_weights="balanced", val_fraction=0, patience=0)
    splits = prepare(cfg, log=quiet)
    counts = torch.bincount(splits.train[1]).double()
    weight = loss_for(cfg, splits).weight
    share = counts.sum().item() / 3
    assert torch.allclose(weight.double() * counts, torch.full((3,), share, dtype=torch.float64))
    assert loss_for(config(root, tmp_path), splits).weight is None


def test_a_balanced_sampler_draws_every_class_about_equally(tmp_path):
    from training.engine.batches import DeviceLoader, Sampling
    labels = torch.tensor([0] * 900 + [1] * 100)
    images = torch.zeros((1000, 3, 4, 4), dtype=torch.uint8)
    sampling = Sampling(shuffle=True, balanced=True)
    loader = DeviceLoader(images, labels, 100, torch.nn.Identity(), sampling)
    drawn = torch.cat([labels[loader.order()] for _ in range(5)])
    share = drawn.float().mean().item()
    assert 0.4 < share < 0.6


def test_a_run_on_class_folders_logs_its_layout_files_and_counts(tmp_path, store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.train import train
    root = make_class_folders(tmp_path / "photos", n_per_class=10)
    (root / "dog" / "dog_003.png").write_bytes(b"")
    result = train(config(root, tmp_path, tracking_uri=store, system_metrics=False,
                          sampler="balanced", class_weights="balanced"), log=quiet)
    run = mlflow.get_run(result.run_id)
    params = run.data.params
    assert params["data_layout"] == "class-folders" and params["skipped_files"] == "1"
    assert params["sampler"] == "balanced" and params["class_weights"] == "balanced"
    assert params["val_source"].startswith("0.2 of each class")
    assert "median shorter side" in params["image_size_reason"]
    client = MlflowClient(store)
    names = {a.path for a in client.list_artifacts(result.run_id, "data")}
    assert {"data/files_train.txt", "data/files_val.txt", "data/files_test.txt",
            "data/skipped_files.csv", "data/class_counts.csv", "data/class_counts.png"} <= names
    test_files = client.download_artifacts(result.run_id, "data/files_test.txt", str(tmp_path))
    assert len(Path(test_files).read_text().splitlines()) == int(params["test_size"])


# --- memory: no copies ---------------------------------------------------------------------

def test_pack_rows_moves_the_chosen_rows_to_the_front_in_place():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (1000, 3, 4, 4), dtype=np.uint8)
    rows = np.sort(rng.choice(1000, 700, replace=False))
    expected = array[rows].copy()
    address = array.ctypes.data
    assert pack_rows(array, rows, block=64) == 700
    assert np.array_equal(array[:700], expected) and array.ctypes.data == address


def test_train_then_val_makes_both_splits_views_of_the_one_array():
    images = torch.arange(40 * 3, dtype=torch.uint8).reshape(40, 3, 1, 1).clone()
    labels = torch.arange(40)
    original = images.clone()
    val_idx = torch.tensor([3, 10, 11, 39])
    keep = torch.ones(40, dtype=torch.bool)
    keep[val_idx] = False
    train_idx = keep.nonzero().squeeze(1)
    n = train_then_val(images, labels, train_idx, val_idx)
    assert n == 36
    assert torch.equal(images[:n], original[train_idx]) and torch.equal(images[n:], original[val_idx])
    assert torch.equal(labels[n:], val_idx) and images[n:].data_ptr() > images.data_ptr()


def test_channel_stats_match_a_float64_reference():
    images = torch.randint(0, 256, (50, 3, 20, 20), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-4)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-4)


def test_pipes_links_and_folders_named_like_images_are_listed_as_skipped_not_read(tmp_path):
    from datagen import make_image_folder

    root = make_image_folder(tmp_path / "d", n_train=6, n_test=3)
    odd = root / "test" / sorted(os.listdir(root / "test"))[0]
    os.mkfifo(odd / "fifo.png")
    (odd / "loop1.png").symlink_to("loop2.png")
    (odd / "loop2.png").symlink_to("loop1.png")
    (odd / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (odd / "elsewhere.png").symlink_to(tmp_path / "outside")  # a link to a folder
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "stranger.png")
    (odd / "x.png").mkdir()
    (odd / "empty.png").touch()
    (odd / "up").symlink_to("..")  # a link loop through a folder
    data = load_dataset(root, cache_dir=tmp_path / "cache", log=lambda *_: None)
    skipped = {Path(name).name: why for name, why in data.skipped}
    assert skipped == {
        "fifo.png": "a named pipe (FIFO), not a file; it was not read",
        "loop1.png": "cannot be read (Too many levels of symbolic links)",
        "loop2.png": "cannot be read (Too many levels of symbolic links)",
        "broken.png": "a broken link",
        "elsewhere.png": "a folder, not an image file; it was not read",
        "x.png": "a folder, not an image file; it was not read",
        "empty.png": "an empty file"}
    assert len(data.test_labels) == 9
