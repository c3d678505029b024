"""Progress a command reports to the app: JSON lines in the file CIFARLAB_EVENTS names, read
back whole lines at a time; a real training command reports decoding, each epoch, its run and
its registered version."""
import json

from shared import progress
from shared.progress import VARIABLE, EventReader, counted, report


def test_nothing_is_written_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(VARIABLE, raising=False)
    report("epoch", epoch=1)
    assert list(counted([1, 2], "x")) == [1, 2]
    assert not list(tmp_path.iterdir())


def test_a_line_is_read_only_once_it_is_whole(tmp_path):
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.read() == []
    path.write_bytes(b'{"event": "run", "run_id": "a"}\n{"event": "ep')
    assert reader.read() == [{"event": "run", "run_id": "a"}]
    with path.open("ab") as file:
        file.write(b'och", "epoch": 1}\nnot json\n')
    assert reader.read() == [{"event": "epoch", "epoch": 1}]
    assert reader.read() == []


def test_a_stage_is_reported_at_most_every_interval_and_its_end_always(monkeypatch, tmp_path):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(VARIABLE, str(path))
    monkeypatch.setattr(progress, "_last", {})
    assert list(counted(range(1000), "features")) == list(range(1000))
    events = EventReader(path).read()
    assert events[0]["done"] == 0 and events[-1] == {"event": "stage", "stage": "features",
                                                     "done": 1000, "total": 1000}
    assert len(events) < 10


def test_training_reports_decoding_each_epoch_its_run_and_its_version(
        monkeypatch, tmp_path, image_folder, store):
    from training.train import main

    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(VARIABLE, str(path))
    code = main(["--model", "cnn", "--data-dir", str(image_folder), "--epochs", "2",
                 "--batch-size", "16", "--device", "cpu", "--no-system-metrics", "--tracking-uri",
                 store, "--cache-dir", str(tmp_path / "cache"), "--register", "reported"])
    assert code == 0
    events = EventReader(path).read()
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "finished" and kinds.count("epoch") == 2 and kinds.count("run") == 1
    stages = {e["stage"] for e in events if e["event"] == "stage"}
    assert {"decoding", "epoch 1/2", "epoch 2/2", "testing, then storing the model"} <= stages
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert "val_acc" in events[kinds.index("epoch")]["metrics"]
    finished = events[-1]
    assert (finished["name"], finished["version"]) == ("reported", "1")
    run = events[kinds.index("run")]
    assert run["run_id"] == finished["run_id"] and run["history"] == []
    json.dumps(events)  # every value plain JSON
