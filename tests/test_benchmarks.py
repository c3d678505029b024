"""A one-epoch smoke run of each speed benchmark on tiny data: they run and report every row."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.engine.build import prepare

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_fast_record_reports_the_recipe_and_each_ablation(image_folder, tmp_path, capsys):
    out = tmp_path / "record.json"
    code = load("fast_record").main([
        "--data-dir", str(image_folder), "--seeds", "1", "--epochs", "1", "--device", "cpu",
        "--ablate", "tta,muon", "--set", "batch_size=16", "--cache-dir", str(tmp_path / "cache"),
        "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["recipe", "without tta",
                                            "Nesterov SGD instead of Muon (10 epochs, lookahead)"]
    assert all(r["runs"] == 1 and 0 <= r["mean_acc"] <= 1 and r["mean_seconds"] > 0 for r in rows)
    assert "| without tta |" in capsys.readouterr().out


def test_fast_record_refuses_a_setting_the_training_config_lacks(capsys):
    with pytest.raises(SystemExit):
        load("fast_record").main(["--data-dir", "x", "--set", "batch=16"])
    assert "expected KEY=VALUE with KEY a training setting" in capsys.readouterr().err


def test_epoch_speed_compares_plain_and_tuned_for_each_model(image_folder, tmp_path):
    out = tmp_path / "speed.json"
    code = load("epoch_speed").main([
        "--data-dir", str(image_folder), "--models", "mlp,fast", "--epochs", "1", "--device",
        "cpu", "--compile", "none", "--batch-size", "16", "--cache-dir", str(tmp_path / "cache"),
        "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["mlp", "fast"]
    for r in rows:
        assert r["plain"]["s_per_epoch"] > 0 and 0 <= r["tuned"]["tracking_share"] < 1


def test_a_benchmark_subset_is_drawn_from_every_class(train_config):
    splits = prepare(train_config(val_fraction=0.0, patience=0))  # in folder order: by class
    classes = set(splits.train[1].tolist())
    small = splits.subset(len(splits.train[1]) // 2)
    assert len(small.train[1]) == len(splits.train[1]) // 2
    assert set(small.train[1].tolist()) == classes


def test_store_race_starts_processes_together_and_checks_each_store(capsys):
    assert load("store_race").main(["--tries", "1", "--processes", "2"]) == 0
    assert "1 tries of 2 processes: 0 of 2 processes failed, 0 of 1 stores broken" in \
        capsys.readouterr().out


def test_tracking_stores_reports_a_row_per_store_with_every_writer_count():
    # a process of its own: its writers are spawned processes that import it by name
    done = subprocess.run([sys.executable, str(BENCHMARKS / "tracking_stores.py"), "--epochs", "2",
                           "--writers", "1,2", "--stores", "sqlite"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "| SQLite file |" in out and "1.0× |" in out
    assert out.count("0, 0, ") == 2  # no failed call, no missing epoch, for 1 and 2 writers


def test_ddp_speed_reports_one_process_against_torchrun(image_folder, tmp_path, capsys):
    code = load("ddp_speed").main([
        "--data-dir", str(image_folder), "--device", "cpu", "--model", "mlp", "--epochs", "2",
        "--rounds", "1", "--batch-size", "16", "--cache-dir", str(tmp_path / "cache"),
        "--work", str(tmp_path / "work")])
    assert code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "process" in line and "|" in line]
    assert len(rows) == 2 and "torchrun, gloo" in rows[1] and "| 1.000 |" in rows[0]


def test_feature_cache_times_head_epochs_with_and_without_the_cache(image_folder, tmp_path):
    out = tmp_path / "features.json"
    code = load("feature_cache").main([
        "--data-dir", str(image_folder), "--train-images", "20", "--rounds", "1",
        "--input-size", "32", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
        "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["train_images"] == 20 and result["speedup"] > 1
    assert result["epoch_seconds with cache"] < result["epoch_seconds without cache"]


def test_photo_table_gives_each_models_answer_per_photo(registered_store, image_folder, capsys):
    photos = sorted((image_folder / "test" / "ship").iterdir())[:2]
    code = load("photo_table").main([
        "--tracking-uri", registered_store, "--models", "tiny-cnn@champion,tiny-cnn/2",
        "--photos", ",".join(map(str, photos)), "--labelled", str(image_folder / "test"),
        "--every", "2"])
    assert code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny-cnn")]
    assert len(rows) == 2 and all(row.count("|") == 6 for row in rows)
    assert all(row.rstrip(" |").endswith("%") for row in rows)


def test_serving_latency_reports_served_and_in_process_percentiles(registered_store, tmp_path):
    out = tmp_path / "latency.json"
    photo = Path(__file__).resolve().parents[1] / "inputs" / "dog.png"
    assert load("serving_latency").main([
        "--tracking-uri", registered_store, "--model", "tiny-cnn@champion", "--image", str(photo),
        "--requests", "3", "--warmup", "1", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    for path in ("served", "in_process"):
        assert 0 < figures[path]["p50_ms"] <= figures[path]["p95_ms"]


def test_heatmap_speed_reports_each_model(registered_store, image_folder, tmp_path):
    out = tmp_path / "heat.json"
    assert load("heatmap_speed").main([
        "--tracking-uri", registered_store, "--models", "tiny-cnn@champion,tiny-cnn/2",
        "--images", str(image_folder / "test" / "cat"), "--rounds", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["tiny-cnn@champion", "tiny-cnn/2"]
    assert all(r["heatmap_ms"] > 0 and r["classify_ms"] > 0 for r in rows)


def test_unsure_share_reports_every_set(registered_store, image_folder, tmp_path):
    out = tmp_path / "unsure.json"
    assert load("unsure_share").main([
        "--tracking-uri", registered_store, "--models", "tiny-cnn/1", "--in-domain",
        str(image_folder / "test"), "--every", "1", "--ood", str(image_folder / "train" / "ship"),
        "--made", "8", "--out", str(out)]) == 0
    rows = {r["set"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"in-domain test", "shuffled 8x8 patches", "uniform noise",
                         "smooth colour fields", "real photos of other things"}
    assert all(0 <= r["flagged"] <= 1 for r in rows.values())
    assert all(0 <= r["auroc"] <= 1 and 0 <= r["auroc_energy"] <= 1
               for k, r in rows.items() if k != "in-domain test")


def test_shuffled_patches_keep_every_pixel_and_move_them():
    import torch

    module = load("unsure_share")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mixed = module.shuffled(images, torch.Generator().manual_seed(0))
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    assert torch.equal(mixed.flatten(1).sort(1).values, images.flatten(1).sort(1).values)


def test_photo_memory_measures_each_run_and_the_slope_per_image_for_each_placement(tmp_path):
    out = tmp_path / "memory.json"
    assert load("photo_memory").main(["--counts", "40,60", "--side", "32", "--work",
                                      str(tmp_path / "w"), "--data-on-device", "yes,no,stream",
                                      "--batch-size", "8",
                                      "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("this checkout, --data-on-device yes", "this checkout, --data-on-device no",
                 "this checkout, --data-on-device stream"):
        runs = report["runs"][name]
        assert all(runs[n]["exit"] == 0 and runs[n]["peak_rss_mb"] > 100 for n in ("40", "60"))
        assert runs["60"]["peak_anon_mb"] > 0 and "anon_mb_per_image" in report["slope"][name]
    assert len(list((tmp_path / "w" / "photos-40-32" / "test").rglob("*.jpg"))) == 10


def test_data_paths_trains_every_path_side_by_side(image_folder, tmp_path):
    from training.shards import main as shards_main
    assert shards_main([str(image_folder), str(tmp_path / "shards"), "--per-shard", "16"]) == 0
    out = tmp_path / "paths.json"
    assert load("data_paths").main(["--data-dir", str(image_folder), "--models", "mlp",
                                    "--shards", str(tmp_path / "shards"), "--rounds", "2",
                                    "--epochs", "2", "--batch-size", "16", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert set(row["rates"]) == {"held", "mapped", "shards", "stream"} and row["images"] == 54
    assert all(len(rates) == 2 and min(rates) > 0 for rates in row["rates"].values())
    assert row["median_ratio"]["held"] == 1.0 and row["median_ratio"]["stream"] > 0


def test_export_speed_measures_each_int8_export_and_the_int8_backbone(image_folder, tmp_path):
    out = tmp_path / "exports.json"
    code = load("export_speed").main([
        "--data-dir", str(image_folder), "--work", str(tmp_path / "work"), "--cnn-epochs", "1",
        "--lite0-epochs", "1", "--per-class", "6", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    for model in ("cnn", "efficientnet_lite0"):
        for variant in ("int8", "int8 float edges"):
            figures = result[model][variant]
            assert figures["images_per_s"] > 0 and figures["images_per_s_pt2"] > 0
            assert 0 <= figures["agreement"] <= 1 and figures["images"] > 0
    features = result["features"]
    assert [features[r]["backbone"] for r in ("pt2", "onnx-int8")] == ["pt2", "onnx-int8"]
    assert features["speedup"] > 0


def test_gpu_figures_runs_every_step_on_the_cpu_in_quick_mode(image_folder, tmp_path):
    gpu = load("gpu_figures")
    out = tmp_path / "out"
    code = gpu.main(["run", "--device", "cpu", "--quick", "--data-dir", str(image_folder),
                     "--out", str(out), "--work", str(tmp_path / "work")])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, [(r["step"], r["status"], r["last_lines"]) for r in summary["steps"]]
    assert [r["step"] for r in summary["steps"]] == [s.name for s in gpu.STEPS]
    assert {r["status"] for r in summary["steps"]} == {"done"}
    assert summary["steps"][0]["figures"]["rows"][0]["variant"] == "recipe"
    alexnet = next(r for r in summary["steps"] if r["step"] == "alexnet")
    assert "test accuracy" in " ".join(alexnet["last_lines"])
    assert sorted(p.name for p in out.iterdir()) == ["profile.txt", "steps.log", "summary.json"]


def test_gpu_figures_skips_what_the_deadline_leaves_no_time_for(image_folder, tmp_path):
    gpu = load("gpu_figures")
    code = gpu.main(["run", "--device", "cpu", "--data-dir", str(image_folder), "--deadline", "5",
                     "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert code == 0 and {r["status"] for r in summary["steps"]} == {"skipped"}
    assert summary["steps"][0]["why"].endswith("s left, it needs 60 s")


def _wheel(folder: Path, name: str) -> Path:
    """A real, minimal wheel of a module `name` that pip can install."""
    import zipfile

    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "ANSWER = 42\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_gpu_figures_carries_the_archive_in_pieces_and_unpacks_it_there(tmp_path):
    import tarfile

    gpu = load("gpu_figures")
    source = tmp_path / "src" / "train" / "cat"
    source.mkdir(parents=True)
    (source / "0.png").write_bytes(bytes(range(256)) * 400)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "train", arcname="train")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "carried_pkg"), _wheel(wheels, "numpy")  # numpy is on the GPU machine already
    into = tmp_path / ".gpu"
    assert gpu.main(["prepare", "--archive", str(archive), "--into", str(into), "--wheels",
                     str(wheels)]) == 0
    carried = sorted(p.name for p in into.rglob("*.whl"))
    assert carried == ["carried_pkg-1.0-py3-none-any.whl"]
    there = dict(site=tmp_path / "site", pieces=tmp_path / "pieces", data=tmp_path / "cifar10")
    flags = [arg for key, value in there.items() for arg in (f"--{key}", str(value))]
    for call in ("call1", "call2", "call3"):
        assert gpu.main(["unpack", str(into / call), *flags]) == 0
    assert (there["data"] / "train" / "cat" / "0.png").read_bytes() == (source / "0.png").read_bytes()
    assert (there["site"] / "carried_pkg" / "__init__.py").is_file()


def test_cache_check_reports_the_checks_cost_in_memory_and_mapped(image_folder):
    results = load("cache_check").main(["--data-dir", str(image_folder), "--rounds", "1"])
    assert set(results) == {"in memory", "mapped"}
    assert all(r["read_s"] > 0 and r["ratio"] > 0 for r in results.values())


def test_serving_memory_reports_one_client_beside_several(registered_store):
    results = load("serving_memory").main(["--tracking-uri", registered_store, "--model",
                                           "tiny-cnn@champion", "--clients", "2", "--side", "1000"])
    assert results["image"]["megapixels"] == 1.0
    for key in ("1 client", "2 clients"):
        assert results[key]["statuses"] == [200]
        assert results[key]["peak_anon_mib"] >= results[key]["idle_anon_mib"] > 0


def test_label_noise_reports_precision_at_k_and_the_three_accuracies(image_folder, tmp_path):
    results = load("label_noise").main([
        "--data-dir", str(image_folder), "--work", str(tmp_path / "work"), "--train-per-class", "10",
        "--test-per-class", "3", "--flip", "0.2", "--epochs", "1", "--input-size", "32"])
    assert results["train_images"] == 30 and results["flipped"] > 0
    assert 0 <= results["precision_at_k"] <= 1
    assert set(results["test_accuracy"]) == {"noisy labels", "without the top k", "true labels"}


def test_window_training_times_each_stage_of_a_folder_to_a_registered_model(image_folder, tmp_path,
                                                                            capsys):
    code = load("window_training").main([
        "--images", str(image_folder / "train"), "--per-class", "8", "--work", str(tmp_path / "w"),
        "--more", "--input-size 32 --epochs 2 --device cpu --no-system-metrics",
        "--corrections", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "24 images in 3 classes, 2 epochs; registered models:/photos-efficientnet_lite0/1" in out
    assert "26 images in 3 classes, 2 epochs; registered models:/photos-efficientnet_lite0/2" in out
    assert out.count("total") == 2 and "reused from an earlier cache" in out.split("retrain")[1]


def test_app_speed_reports_first_and_later_launches(registered_store, image_folder):
    out = subprocess.run([sys.executable, str(BENCHMARKS / "app_speed.py"), "--tracking-uri",
                          registered_store, "--models", "tiny-cnn@champion", "--images",
                          str(image_folder / "test" / "cat"), "--launch-folder",
                          str(image_folder / "test" / "cat"), "--rounds", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("| first | pt2 |", "| later, no preloading | pt2 |", "| later | pt2 |",
                "| tiny-cnn@champion |"):
        assert row in out.stdout
