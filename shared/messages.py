"""Messages for people: one line per error, no password from a URI. Standard library only:
every layer uses it."""
from __future__ import annotations

import re


class BadInput(Exception):
    """Bad input: the message says what is wrong and how to fix it, and nothing was started or
    changed. Commands exit 2 with it (shared.command.run_command)."""


class RunFailed(Exception):
    """A run that started and failed; it was marked FAILED. Commands exit 1 with it."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM ended the command; the message says what was kept. Exit 130."""


CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
SECRET_QUERY = re.compile(r"(?P<key>[?&](?:password|passwd|pwd|token|secret)=)[^&\s]*",
                          re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """`postgresql://user:PW@host/db` -> `postgresql://user:***@host/db` (and `?password=`)
    anywhere in `text`: what a run logs or prints never holds a password from a URI."""
    text = CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)


SHOWN = 200  # characters of a value a message shows


def shown(value, text: bool = False) -> str:
    """`value` for a message (its repr, or itself with `text`), cut to SHOWN characters: a
    value from a file or a request can be megabytes long."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 600:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    out = str(value) if text else repr(value)
    return out if len(out) <= SHOWN else f"{out[:SHOWN]}... ({len(out):,} characters)"


def brief(exc: BaseException) -> str:
    """An exception in one line: database errors carry their SQL statement on later lines."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
