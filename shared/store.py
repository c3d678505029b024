"""Where the MLflow store is. Standard library only, so the app's window can start without
importing MLflow or PyTorch.

Every entry point imports this module, so it also sets the process's second wall against
code in model artifacts: MLflow may not unpickle (its default in 3.17 is to allow it). The
first wall is shared/safe_model.py, which checks a model's files before anything reads them.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from shared.messages import BadInput, mask_secrets

os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

CHAMPION = "champion"  # the registry alias of each model's best version
SCORE_TAG = "best_val_acc"  # the model-version tag the champion rule compares


def tracking_uri(explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path.cwd() / "mlruns"
    store.mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


class StoreBroken(BadInput):
    """The SQLite store exists but cannot be opened; the message says how to repair it."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def store_folder(uri: str) -> Path:
    """The folder of a store's own files (checkpoints, the tuner's Optuna file): beside the
    SQLite database, else ./mlruns."""
    db = sqlite_path(uri)
    return db.parent if db is not None else Path.cwd() / "mlruns"


@contextlib.contextmanager
def creation_lock(uri: str, purpose: str = "lock") -> Iterator[None]:
    """An exclusive lock beside a SQLite database (`<db>.<purpose>`) while it is created or
    opened, so that processes started together never run its schema migrations at the same
    time (they left stores half-migrated); also taken, as "champion.lock", while a registration
    settles the champion alias. Other URIs get none: a server or database serialises itself."""
    db = sqlite_path(uri)
    if db is None or not db.parent.is_dir():  # no store can be created there: MLflow says so
        yield
        return
    with open(db.with_name(f"{db.name}.{purpose}"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class DriverMissing(BadInput):
    """A database URL whose Python driver is not installed; the message names the install."""


def check_driver(url: str) -> None:
    """Raise DriverMissing when `url` is a database URL (postgresql://, mysql://...) whose
    driver, as the installed SQLAlchemy resolves it, cannot be imported."""
    scheme = url.split(":", 1)[0].lower()
    if "://" not in url or scheme in ("sqlite", "file", "http", "https", "databricks"):
        return
    try:
        from sqlalchemy.engine import make_url
        make_url(url).get_dialect().import_dbapi()
    except ImportError as exc:
        install = ("pip install 'cifarlab[server]' (it brings psycopg, the driver SQLAlchemy "
                   "uses for postgresql://)" if scheme.startswith("postgresql")
                   else f"install the driver module that {scheme}:// needs")
        raise DriverMissing(f"the database driver for {mask_secrets(url)} is not installed "
                            f"({exc}); {install}") from None
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy knows: the store says what is wrong
        return


REACH_TIMEOUT = 10  # seconds a command waits for a store before it says what to check


class StoreUnreachable(BadInput):
    """A tracking server or database that does not answer, or refuses the account."""


def ask_server(uri: str) -> None:
    """One read of a tracking server's API, within REACH_TIMEOUT, with the account MLflow's
    client would send: raises StoreUnreachable saying what to check when it cannot be read."""
    import base64
    import ssl
    import urllib.error
    import urllib.request
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or unquote(parts.username or "") or None
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or unquote(parts.password or "")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(f"{bare.rstrip('/')}/api/2.0/mlflow/experiments/search"
                                     "?max_results=1")
    if user:
        secret = f"{user}:{password}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(secret).decode())
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    context = None
    if uri.startswith("https://"):
        context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    where = f"the tracking server {mask_secrets(uri)}"
    try:
        urllib.request.urlopen(request, timeout=REACH_TIMEOUT, context=context).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401 and not user:
            raise StoreUnreachable(
                f"{where} asks who you are: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to your account (its admin adds one with "
                "python -m training.servers add-user NAME)") from None
        if exc.code == 401:
            raise StoreUnreachable(
                f"{where} refused the account {user!r}: wrong name or password (check "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)") from None
        if exc.code == 403:
            raise StoreUnreachable(f"{where} lets the account {user!r} read nothing: ask its "
                                   "admin for READ or EDIT permission") from None
        raise StoreUnreachable(f"{where} answered HTTP {exc.code} ({exc.reason}) to a "
                               "search: is that address an MLflow server?") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreUnreachable(
            f"{where} cannot be reached ({str(reason)[:200]}) within {REACH_TIMEOUT} s: check "
            "that it is running, its address and port, and the network between") from None


def refused_write(exc: BaseException) -> str | None:
    """What to do when the tracking server answered a write with 403 (an account with READ
    permission only), else None."""
    code = getattr(exc, "get_http_status_code", lambda: None)()
    if code != 403 and "error code 403" not in str(exc):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this account")
    return (f"the tracking server lets {user!r} read but not write here: ask its admin for "
            f"EDIT permission (python -m training.servers add-user {user} --permission EDIT)")


def ask_database(uri: str) -> None:
    """Connect to a database store once, within REACH_TIMEOUT: raises StoreUnreachable with
    what to check, instead of MLflow's minutes of retries and a traceback."""
    from sqlalchemy import create_engine, text

    scheme = uri.split(":", 1)[0].lower()
    options = {"connect_timeout": REACH_TIMEOUT} if scheme.startswith(("postgresql", "mysql")) else {}
    try:
        engine = create_engine(uri, connect_args=options)
        try:
            with engine.connect() as db:
                db.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - drivers raise their own kinds; all mean the same
        cause = getattr(exc, "orig", None) or exc
        raise StoreUnreachable(
            f"the database {mask_secrets(uri)} cannot be opened ({type(cause).__name__}: "
            f"{mask_secrets((str(cause).strip().splitlines() or [''])[0])[:200]}): check that "
            "it is running, its address, port, database name, user and password") from None


def use_store(uri: str) -> None:
    """Point MLflow's tracking and registry at `uri`, creating a new SQLite store under the
    creation lock. Raises StoreBroken, with the repair, for a store that cannot be opened,
    DriverMissing for a database URL whose driver is not installed, and StoreUnreachable for
    a server or database that does not answer within REACH_TIMEOUT or refuses the account."""
    import mlflow  # here, not at the top: see the module docstring
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mask_secrets(uri) != uri:  # MLflow would print "View run at <uri with the password>"
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    check_driver(uri)
    if uri.startswith(("http://", "https://")):
        ask_server(uri)
    elif "://" in uri and sqlite_path(uri) is None and not uri.startswith(("file:", "databricks")):
        ask_database(uri)
    if sqlite_path(uri) is None:
        return
    with creation_lock(uri):
        try:
            client = MlflowClient(uri, registry_uri=uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        except Exception as exc:  # noqa: BLE001 - migration and database errors of many kinds
            raise StoreBroken(repair_advice(sqlite_path(uri), exc)) from exc


def repair_advice(db: Path, exc: Exception) -> str:
    """Why the SQLite store `db` cannot be opened, and what to do about it."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            runs = con.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.Error:
        return (f"the MLflow store {db} cannot be opened ({type(exc).__name__}: {first}); "
                "check the path and its permissions")
    half = any(t.startswith("_alembic_tmp_") for t in tables)
    if not half and "out-of-date database schema" not in str(exc):
        return f"the MLflow store {db} cannot be opened ({type(exc).__name__}: {first})"
    cause = ("its schema migration was interrupted (leftover _alembic_tmp_ tables)" if half
             else f"its schema is not the one this MLflow expects ({first})")
    if runs == 0:
        return (f"the MLflow store {db} is broken: {cause}. It holds no runs, so delete it "
                f"(rm {db}) and start again; the next command creates it afresh")
    return (f"the MLflow store {db} is broken: {cause}. It holds {runs} run(s): back it up "
            f"(cp {db} {db}.bak), then run `mlflow db upgrade sqlite:///{db}`")


def ui_page(experiment_id: str, run_id: str | None = None) -> str:
    """The UI's page of an experiment's runs (or of one run) in its model-training view. MLflow
    3.17's UI opens experiments in its GenAI view unless told otherwise: its GenAI/Model
    training switch is kept per browser, and the experimentKind tag did not override it in a
    fresh browser (docs/mlflow_ui.py checks this)."""
    run = f"/{run_id}" if run_id else ""
    return f"#/experiments/{experiment_id}/runs{run}?workflowType=machine_learning"


def ui_command(uri: str, page: str = "") -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {mask_secrets(uri).rstrip('/')}/{page} in a browser"
    then = f", then open http://127.0.0.1:5000/{page}" if page else ""
    return f"mlflow ui --backend-store-uri {mask_secrets(uri)}{then}"
