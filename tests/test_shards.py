"""WebDataset shards written from a dataset's folder and trained on: the same images as the
folder, the manifest's fingerprint, damaged shards named, bad input refused in one line."""
import json
import subprocess
import sys

import mlflow
import pytest
import torch

from training.engine.data import DatasetError, load_dataset
from training.engine.shards import MANIFEST
from training.shards import main as shards_main
from training.train import train

from datagen import make_class_folders


def quiet(*_):
    pass


@pytest.fixture
def shards(image_folder, tmp_path):
    out = tmp_path / "shards"
    assert shards_main([str(image_folder), str(out), "--per-shard", "16"]) == 0
    return out


def by_name(data, split):
    """A split's {file name: (image, label)}: shards hold the training images shuffled."""
    images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
    return {name: (images[i], int(labels[i])) for i, name in enumerate(data.files[split])}


def same_split(a, b, split) -> bool:
    a, b = by_name(a, split), by_name(b, split)
    return a.keys() == b.keys() and all(
        torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)


def test_shards_hold_every_image_of_each_split_with_a_manifest(shards):
    manifest = json.loads((shards / MANIFEST).read_text())
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    assert counts == {"train": 54, "val": 6, "test": 18}  # a tenth of each class's 20 held out
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [
        f"train-{i:06d}.tar" for i in range(4)]
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        [MANIFEST] + [s["name"] for split in manifest["splits"].values() for s in split["shards"]])


def test_shards_decode_to_the_same_images_and_labels_as_their_folder(image_folder, tmp_path):
    shards = tmp_path / "shards"
    assert shards_main([str(image_folder), str(shards), "--per-shard", "16", "--val-fraction", "0"]) == 0
    folder = load_dataset(image_folder, cache_dir=tmp_path / "a", log=quiet)
    sharded = load_dataset(shards, cache_dir=tmp_path / "b", log=quiet, mapped=True)
    assert sharded.layout == "shards" and sharded.classes == folder.classes
    assert same_split(folder, sharded, "train") and same_split(folder, sharded, "test")
    assert sharded.files["train"] != folder.files["train"]  # in a fixed shuffled order
    assert sharded.fingerprint == json.loads((shards / MANIFEST).read_text())["fingerprint"]


def test_shards_hold_out_a_validation_split_by_file_name_and_mix_the_classes(image_folder, shards,
                                                                           tmp_path):
    folder = load_dataset(image_folder, cache_dir=None, log=quiet)
    sharded = load_dataset(shards, cache_dir=None, log=quiet)
    assert sorted(sharded.files["train"] + sharded.files["val"]) == sorted(folder.files["train"])
    assert torch.bincount(sharded.val_labels).tolist() == [2, 2, 2]
    first_shard = sharded.train_labels[:16]
    assert len(set(first_shard.tolist())) == 3  # the folder's order has one class after another
    again = tmp_path / "again"
    assert shards_main([str(image_folder), str(again), "--per-shard", "16"]) == 0
    assert (again / MANIFEST).read_text().replace(str(again), "") == (
        (shards / MANIFEST).read_text().replace(str(shards), ""))


def test_a_run_on_shards_logs_the_manifest_fingerprint_as_the_dataset(shards, train_config):
    result = train(train_config(data_dir=str(shards)), log=quiet)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["data_layout"] == "shards"
    fingerprint = json.loads((shards / MANIFEST).read_text())["fingerprint"]
    assert run.data.tags["dataset_fingerprint"] == fingerprint
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == fingerprint


def test_a_truncated_shard_is_named_and_its_images_skipped_or_refused(shards, train_config):
    victim = shards / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    data = load_dataset(shards, cache_dir=None, log=quiet)
    assert 0 < len(data.skipped) <= 16 and len(data.train_labels) == 54 - len(data.skipped)
    assert all(name.startswith("train-000001.tar#") for name, _ in data.skipped)
    with pytest.raises(DatasetError, match=r"(?s)train-000001\.tar#16 \(the shard is damaged.*--max-skipped"):
        train(train_config(data_dir=str(shards)), log=quiet)
    result = train(train_config(data_dir=str(shards), max_skipped=0.5), log=quiet)
    assert mlflow.get_run(result.run_id).data.params["skipped_files"] == str(len(data.skipped))


def test_class_folders_are_split_for_the_shards_as_training_splits_them(tmp_path):
    root = make_class_folders(tmp_path / "pets", n_per_class=12)
    out = tmp_path / "shards"
    assert shards_main([str(root), str(out), "--per-shard", "10", "--val-fraction", "0"]) == 0
    folder = load_dataset(root, cache_dir=None, log=quiet)
    sharded = load_dataset(out, cache_dir=None, log=quiet)
    assert sorted(sharded.files["train"]) == sorted(folder.files["train"])
    assert sharded.files["test"] == folder.files["test"]
    assert torch.equal(sharded.test_images, folder.test_images)


def test_cifar10_in_torchvision_form_is_written_as_png_shards(cifar_mirror, tmp_path):
    load_dataset(tmp_path / "cifar", cache_dir=None, log=quiet)  # downloads from the mirror
    out = tmp_path / "shards"
    assert shards_main([str(tmp_path / "cifar"), str(out)]) == 0
    cifar = load_dataset(tmp_path / "cifar", cache_dir=None, log=quiet, download=False)
    sharded = load_dataset(out, cache_dir=None, log=quiet)
    rows = [int(name[len("train/"):-len(".png")]) for name in sharded.files["train"] + sharded.files["val"]]
    assert sorted(rows) == list(range(len(cifar.train_labels)))
    assert torch.equal(cifar.train_images[rows], torch.cat([sharded.train_images, sharded.val_images]))
    assert torch.equal(cifar.train_labels[rows], torch.cat([sharded.train_labels, sharded.val_labels]))
    assert sharded.classes == cifar.classes


def test_a_folder_that_is_not_empty_is_refused_in_one_line(image_folder, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "training.shards", str(image_folder), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "not empty" in done.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_manifest_naming_a_missing_shard_is_refused_in_one_line(shards, tmp_path):
    (shards / "test-000000.tar").unlink()
    with pytest.raises(DatasetError, match=r"test-000000\.tar.*copy them beside the manifest"):
        load_dataset(shards, cache_dir=None, log=quiet)


def test_two_torchrun_processes_on_shards_train_one_run_with_each_epoch_logged_once(
        shards, store, tmp_path):
    from test_distributed import history, only_run, run, torchrun, training_args

    run(torchrun("--standalone", "--nproc-per-node", "2")
        + training_args(shards, store, tmp_path, "--model", "mlp", "--epochs", "2",
                        "--data-on-device", "no"))
    ddp = only_run(store)
    assert ddp.info.status == "FINISHED" and ddp.data.params["world_size"] == "2"
    assert ddp.data.params["data_layout"] == "shards"
    assert ddp.data.params["data_placement"] == "memory-mapped cache"
    assert [step for step, _ in history(store, ddp.info.run_id, "train_loss")] == [1, 2]
    assert len(list((tmp_path / "cache" / "datasets").iterdir())) == 1  # one cache, built once


def test_a_model_evaluated_on_shards_scores_their_test_split_as_on_the_folder(
        registered, registered_store, shards, tmp_path):
    from test_evaluate import evaluation_runs

    from training.evaluate import main as evaluate_main
    assert evaluate_main(["--model", "tiny-cnn/1", "--data-dir", str(shards), "--tracking-uri",
                          registered_store, "--cache-dir", str(tmp_path / "cache")]) == 0
    (run,) = evaluation_runs(registered_store)
    assert run.data.metrics["images"] == 18
    assert run.data.metrics["accuracy"] == pytest.approx(registered[1].test_acc, abs=1e-9)


@pytest.fixture
def served(shards):
    """The shards' parent folder over HTTP on 127.0.0.1, as object storage serves them."""
    from training.servers import free_port
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(shards.parent)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time
    import urllib.request
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/shards/{MANIFEST}", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/shards"
    server.terminate()
    server.wait(timeout=10)


@pytest.mark.parametrize("how", ["http", "pipe"])
def test_shards_are_read_from_a_url_or_a_pipe_command_as_from_their_folder(
        how, served, shards, image_folder, train_config, tmp_path):
    data_dir = served if how == "http" else f"pipe:cat {shards}/{{}}"
    result = train(train_config(data_dir=data_dir), log=quiet)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["data_layout"] == "shards"
    fingerprint = json.loads((shards / MANIFEST).read_text())["fingerprint"]
    assert run.data.tags["dataset_fingerprint"] == fingerprint
    local = load_dataset(shards, cache_dir=None, log=quiet)
    remote = load_dataset(data_dir, cache_dir=tmp_path / "other", log=quiet)
    assert all(same_split(local, remote, split) for split in ("train", "val", "test"))


def test_a_pipe_command_without_a_place_for_the_file_name_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"names each file with \{\}"):
        load_dataset("pipe:cat shards.tar", cache_dir=tmp_path, log=quiet)


def test_a_url_with_no_manifest_is_refused_in_one_line(tmp_path):
    with pytest.raises(DatasetError, match="cannot read manifest.json at pipe:cat") as caught:
        load_dataset(f"pipe:cat {tmp_path}/{{}}", cache_dir=tmp_path, log=quiet)
    assert "\n" not in str(caught.value)


def test_a_brace_pattern_of_shard_names_reads_the_shards_of_its_folder(shards, tmp_path):
    pattern = f"{shards}/train-{{000000..000003}}.tar"
    assert load_dataset(pattern, cache_dir=None, log=quiet).fingerprint == json.loads(
        (shards / MANIFEST).read_text())["fingerprint"]
    with pytest.raises(DatasetError, match=r"names 1 shard\(s\) that its manifest does not \(train-000004"):
        load_dataset(f"{shards}/train-{{000003..000004}}.tar", cache_dir=None, log=quiet)
