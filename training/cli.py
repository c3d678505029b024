"""What the training commands share around `train()`: stop signals and the settings of a run
to resume. Exit statuses for known failures are shared.command's, as for every command."""
from __future__ import annotations

import signal
import sys

from shared.store import tracking_uri
from training.engine import distributed
from training.engine.config import ConfigError, TrainConfig, added_settings
from training.tracking import checkpoint
from training.tracking.run import Resume


class StopSignals:
    """SIGINT/SIGTERM: the first asks training to stop after the step in progress; a second
    exits at once. Installed by the command, never by the importable `train()`."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        if not distributed.world().is_main:  # torchrun signals every process; rank 0 speaks
            return
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return self.received is not None


def resume_config(cfg: TrainConfig) -> tuple[TrainConfig, Resume]:
    """The resumed run's own config, and its id and checkpoint. The checkpoint's settings are
    checked like a new run's: a damaged or edited checkpoint is refused, not trained on."""
    uri = tracking_uri(cfg.tracking_uri)
    run_id = checkpoint.find_resumable(uri, cfg.resume)
    path = checkpoint.checkpoint_path(uri, run_id)
    ckpt = checkpoint.load(path)
    saved = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        raise checkpoint.ResumeError(f"the checkpoint {path} holds no settings; it is not one "
                                     "this project wrote")
    fields = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(saved) - fields)
    missing = sorted(fields - set(saved) - set(added_settings()))
    if unknown or missing:
        raise checkpoint.ResumeError(
            f"the checkpoint {path} has settings this version does not know ({', '.join(unknown) or 'none'}) "
            f"or lacks some it needs ({', '.join(missing) or 'none'}); it was written by another "
            "version or edited, so it cannot be resumed: start a new run")
    # the store that held the run, as named now: the checkpoint keeps no password
    settings = {**{name: getattr(TrainConfig, name) for name in added_settings()}, **saved,
                "resume": None, "tracking_uri": cfg.tracking_uri}
    try:
        resumed = TrainConfig(**settings).validate()
    except ConfigError as exc:
        raise checkpoint.ResumeError(f"the checkpoint {path} holds a bad setting: {exc}") from None
    return resumed, Resume(run_id, ckpt)
