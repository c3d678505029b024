import numpy as np
import pytest
import torch

from training.engine.data import DatasetError, channel_stats, load_dataset, split_indices

from datagen import CLASSES, make_image_folder


def quiet(*_):
    pass


def test_image_folder_classes_come_from_the_folder_names(image_folder, tmp_path):
    data = load_dataset(image_folder, cache_dir=tmp_path, log=quiet)
    assert data.form == "image-folder"
    assert data.classes == sorted(CLASSES)
    assert data.train_images.shape == (60, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (18, 3, 32, 32)
    assert sorted(data.train_labels.unique().tolist()) == [0, 1, 2]


def test_second_load_comes_from_the_cache_without_decoding(image_folder, tmp_path, monkeypatch):
    first = load_dataset(image_folder, cache_dir=tmp_path, log=quiet)
    monkeypatch.setattr("training.engine.data._decode_found", lambda *a, **k: pytest.fail("decoded again"))
    second = load_dataset(image_folder, cache_dir=tmp_path, log=quiet)
    assert torch.equal(first.train_images, second.train_images)
    assert first.fingerprint == second.fingerprint


def test_a_changed_file_invalidates_the_cache_and_changes_the_fingerprint(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=4, n_test=2)
    first = load_dataset(root, cache_dir=tmp_path / "c", log=quiet)
    victim = next((root / "train" / "cat").iterdir())
    from PIL import Image
    Image.new("RGB", (32, 32), (1, 2, 3)).save(victim)
    second = load_dataset(root, cache_dir=tmp_path / "c", log=quiet)
    assert second.fingerprint != first.fingerprint


def test_images_of_other_sizes_are_resized_to_the_requested_size(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=3, n_test=2, size=48)
    data = load_dataset(root, image_size=24, cache_dir=None, log=quiet)
    assert data.train_images.shape[1:] == (3, 24, 24)


def test_split_is_fixed_by_its_seed_and_disjoint():
    train_a, val_a = split_indices(100, 0.1, seed=0)
    train_b, val_b = split_indices(100, 0.1, seed=0)
    _, val_c = split_indices(100, 0.1, seed=1)
    assert torch.equal(val_a, val_b) and not torch.equal(val_a, val_c)
    assert len(val_a) == 10 and len(train_a) == 90
    assert set(train_a.tolist()).isdisjoint(val_a.tolist())


def test_default_split_of_cifar10_is_45000_to_5000():
    train, val = split_indices(50_000, 0.1, seed=0)
    assert (len(train), len(val)) == (45_000, 5_000)


def test_channel_stats_of_constant_images():
    images = torch.full((4, 3, 8, 8), 51, dtype=torch.uint8)
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.2, 0.2, 0.2)) and std == pytest.approx((0, 0, 0), abs=1e-5)


def test_cifar10_is_downloaded_through_torchvision_into_the_data_dir(cifar_mirror, tmp_path):
    data = load_dataset(tmp_path / "data", cache_dir=tmp_path / "cache", log=quiet)
    assert data.form == "torchvision" and data.name == "cifar10"
    assert (tmp_path / "data" / "cifar-10-batches-py").is_dir()
    assert data.classes == [f"class{i}" for i in range(10)]
    assert data.train_images.shape == (40, 3, 32, 32) and data.test_images.shape == (12, 3, 32, 32)


def test_offline_cifar10_download_explains_the_ways_out(offline, tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "data", cache_dir=None, log=quiet)
    message = str(err.value)
    assert "download failed" in message
    assert "cifar-10-python.tar.gz" in message and "train/<class>" in message


def test_corrupt_cifar10_files_say_how_to_recover(cifar_mirror, tmp_path):
    load_dataset(tmp_path / "data", cache_dir=None, log=quiet)
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="corrupt.*Delete that folder"):
        load_dataset(tmp_path / "data", cache_dir=None, log=quiet)


def test_a_corrupt_image_file_is_skipped_and_named(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=3, n_test=2)
    bad = root / "train" / "dog" / "0001.png"
    bad.write_bytes(b"\x89PNG not really")
    data = load_dataset(root, cache_dir=None, log=quiet)
    assert [name for name, _ in data.skipped] == ["train/dog/0001.png"]
    assert len(data.train_labels) == 8 and bad.read_bytes() == b"\x89PNG not really"


def test_image_folder_without_test_split_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=2, n_test=1)
    import shutil
    shutil.rmtree(root / "test")
    with pytest.raises(DatasetError, match="no test/ folder"):
        load_dataset(root, cache_dir=None, log=quiet)


def test_test_classes_unknown_to_train_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=2, n_test=1)
    (root / "test" / "frog").mkdir()
    (root / "test" / "cat" / "0000.png").rename(root / "test" / "frog" / "0000.png")
    with pytest.raises(DatasetError, match="frog"):
        load_dataset(root, cache_dir=None, log=quiet)


def test_cache_arrays_are_plain_numpy_files(image_folder, tmp_path):
    load_dataset(image_folder, cache_dir=tmp_path, log=quiet)
    cached = list((tmp_path / "datasets").glob("tiny-*/train_images.npy"))
    assert len(cached) == 1 and np.load(cached[0]).dtype == np.uint8
