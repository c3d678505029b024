"""Progress a command reports to whoever started it, as JSON lines in the file named by
CIFARLAB_EVENTS (the app sets it when it runs `training.train`). Without the variable nothing is
written. The format lives here once: commands write it with `report`, the app reads it with
`EventReader`.

Events: {"event": "stage", "stage", "done", "total"} (decoding, features, training, testing);
{"event": "run", "run_id", "experiment_id", "ui"}; {"event": "epoch", "epoch", "epochs",
"metrics"}; {"event": "registered", "name", "version", "test_acc", "promoted"}.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

VARIABLE = "CIFARLAB_EVENTS"
INTERVAL = 0.25  # seconds between two "stage" events of one stage, its last one excepted

_last: dict[str, float] = {}


def report(event: str, **fields) -> None:
    """Append one event; a stage's progress at most every INTERVAL seconds (its end always)."""
    path = os.environ.get(VARIABLE)
    if not path:
        return
    if event == "stage" and fields.get("done", 0) < fields.get("total", 0):
        now = time.monotonic()
        if now - _last.get(fields["stage"], 0.0) < INTERVAL:
            return
        _last[fields["stage"]] = now
    line = json.dumps({"event": event, **fields}, default=float)
    try:
        with open(path, "a", encoding="utf-8") as file:
            file.write(line + "\n")
    except OSError:
        pass  # progress is a courtesy: a run never fails for want of it


def counted(items, stage: str):
    """`items` passed through, a "stage" event after each (the first at 0); items of unknown
    number (a stream) are passed through unreported."""
    if not os.environ.get(VARIABLE) or not hasattr(items, "__len__"):
        yield from items
        return
    total = len(items)
    report("stage", stage=stage, done=0, total=total)
    for done, item in enumerate(items, start=1):
        yield item
        report("stage", stage=stage, done=done, total=total)


class EventReader:
    """The events a command has appended to `path` since the last read (whole lines only)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = Path(path), 0, b""

    def read(self) -> list[dict]:
        try:
            with self.path.open("rb") as file:
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events
