"""Checkpoint and metric writes on a background thread, so training never waits on the disk
or the tracking server."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class BackgroundWriter:
    """Runs submitted jobs one at a time, in order, on one thread (or at once when `enabled`
    is false). A job's unexpected exception is raised again by the next `drain()`."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.error: BaseException | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="checkpoint-and-metrics",
                                            daemon=True)
            self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        if self.enabled:
            self._jobs.put(job)
        else:
            job()

    def drain(self) -> None:
        """Wait until every submitted job has run."""
        if self.enabled:
            self._jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self.error = self.error or exc
            finally:
                self._jobs.task_done()
        self._jobs.task_done()
