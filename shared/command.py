"""The one runner every command's `main` goes through: a known failure becomes one line on
stderr and an exit status, never a traceback. 2: bad input (BadInput), nothing was started or
changed, or a tracking server refused a read-only account's write; 1: a run that started and
failed (RunFailed); 130: interrupted. An error joins by subclassing, so no list of error types
has to be kept beside the commands."""
from __future__ import annotations

import sys
from collections.abc import Callable

from shared.messages import BadInput, Interrupted, RunFailed
from shared.store import refused_write


def run_command(body: Callable[[], int]) -> int:
    """`body()`'s exit status, or the status of the known failure it raised."""
    try:
        return body()
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"error: {exc}. The run was marked FAILED (if the store could be told).",
              file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    except Exception as exc:
        refusal = refused_write(exc)
        if refusal is None:
            raise
        print(f"error: {refusal}", file=sys.stderr)
        return 2
