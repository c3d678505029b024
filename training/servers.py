"""A team's servers on one host, on the existing engines: PostgreSQL (Debian's `postgresql`
package) with one database for MLflow and one for Optuna, and `mlflow server` on it with
proxied artifacts, so clients need no shared disk.

    python -m training.servers --dir servers --host 0.0.0.0     # or: make server

Prints what every client exports, then runs until Ctrl-C. The tests start the same servers
on 127.0.0.1 through this module.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from shared.messages import BadInput
from shared.store import DriverMissing, check_driver

ROLE = "cifarlab"  # the PostgreSQL role that owns both databases
DATABASES = ("mlflow", "optuna")


class ServerError(BadInput):
    """A server that cannot be installed, set up or started; the message says what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_tool(name: str) -> str:
    """initdb / pg_ctl: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found or versions:
        return found or str(versions[-1])
    raise ServerError(f"PostgreSQL's {name} is not installed: on Debian or Ubuntu "
                      "`apt-get install postgresql` (the server is not started as a service; "
                      "this command runs its own on a private folder and port)")


def as_database_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def wait_for(ready, what: str, process: subprocess.Popen | None, log: Path,
             timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise ServerError(f"{what} did not start; the end of {log}:\n{tail}")
        time.sleep(0.3)


class Postgres:
    """A PostgreSQL cluster in `folder` (created on first start), listening on `listen`:`port`.
    Local socket connections are trusted; TCP connections need the role's password, kept in
    `folder`/password (0600)."""

    def __init__(self, folder: Path, port: int = 5432, listen: str = "127.0.0.1"):
        self.folder, self.port, self.listen = folder.resolve(), port, listen
        self.data, self.log = self.folder / "data", self.folder / "postgres.log"
        self.password_file = self.folder / "password"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, database: str, host: str = "127.0.0.1") -> str:
        return (f"postgresql://{ROLE}:{quote(self.password, safe='')}@{host}:{self.port}/"
                f"{database}")

    def _run(self, *command: str) -> str:
        done = subprocess.run(as_database_user(list(command)), capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerError(f"{Path(command[0]).name} failed: {(done.stderr or done.stdout)[-1500:]}")
        return done.stdout

    def init(self) -> None:
        """A new cluster: the role with a random password, scram for TCP, trust for the socket."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.password_file.write_text(secrets.token_urlsafe(18) + "\n")
        self.password_file.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            shutil.chown(self.password_file, "postgres", "postgres")
        self._run(postgres_tool("initdb"), "-D", str(self.data), "-U", ROLE, "-E", "UTF8",
                  f"--pwfile={self.password_file}", "--auth-local=trust",
                  "--auth-host=scram-sha-256")
        if self.listen not in ("127.0.0.1", "localhost"):
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self.init()
        options = f"-p {self.port} -c listen_addresses={self.listen} -k {self.folder}"
        self._run(postgres_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o", options, "start")
        for name in DATABASES:
            self.create_database(name)

    def create_database(self, name: str, template: str | None = None) -> None:
        """`name`, unless it exists; a copy of `template` when given (one that no one is
        connected to)."""
        import psycopg

        copy = f' TEMPLATE "{template}"' if template else ""
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            if not db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                db.execute(f'CREATE DATABASE "{name}"{copy}')

    def stop(self) -> None:
        self._run(postgres_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


class LocalServer:
    """A server process started in its own session, healthy once `health_path` answers on
    127.0.0.1:`port`, stopped with everything it started."""

    health_path = "/health"
    port: int
    log: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.url}{self.health_path}", timeout=1)
            return True
        except OSError:
            return False

    def launch(self, command: list[str], what: str, timeout: float, **popen) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, **popen)
        try:
            wait_for(self.healthy, what, self.process, self.log, timeout)
        except ServerError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and its uvicorn workers
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 90) -> None:
        raise NotImplementedError


class MlflowServer(LocalServer):
    """`mlflow server` on `backend` (a database URL), storing artifacts in `artifacts` and
    serving them to clients over HTTP; it can be stopped and started again."""

    def __init__(self, backend: str, artifacts: Path, port: int | None = None,
                 host: str = "127.0.0.1", allowed_hosts: str | None = None):
        self.backend, self.artifacts = backend, artifacts.resolve()
        self.host, self.port = host, port or free_port()
        self.allowed_hosts = allowed_hosts
        self.log = self.artifacts.parent / f"mlflow-server-{self.port}.log"

    def start(self, timeout: float = 90) -> None:
        command = [str(Path(sys.executable).with_name("mlflow")), "server",
                   "--backend-store-uri", self.backend, "--serve-artifacts",
                   "--artifacts-destination", str(self.artifacts), "--host", self.host,
                   "--port", str(self.port), "--workers", "1"]
        if self.allowed_hosts:
            command += ["--allowed-hosts", self.allowed_hosts]
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.launch(command, "the MLflow server", timeout, cwd=self.artifacts.parent)


class ModelServer(LocalServer):
    """`mlflow models serve` of a registered model in this environment (--env-manager local),
    answering images through shared.serving; `log` keeps its output."""

    health_path = "/ping"

    def __init__(self, model_uri: str, tracking_uri: str, log: Path, port: int | None = None,
                 host: str = "127.0.0.1"):
        self.model_uri, self.tracking_uri, self.log = model_uri, tracking_uri, log
        self.host, self.port = host, port or free_port()

    def start(self, timeout: float = 120) -> None:
        bin_dir = str(Path(sys.executable).parent)  # MLflow starts uvicorn through the shell
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri,
               "MLFLOW_REGISTRY_URI": self.tracking_uri,
               "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        command = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", self.model_uri,
                   "--env-manager", "local", "--host", self.host, "--port", str(self.port),
                   "--workers", "1"]
        self.launch(command, f"the model server for {self.model_uri}", timeout, env=env)


def team_hosts(public: str, port: int) -> str:
    """Host headers the MLflow server accepts: the name clients use, loopback, private IPs."""
    names = [public, "localhost", "127.0.0.1", "10.*", "172.*", "192.168.*"]
    return ",".join(n for name in names for n in (name, f"{name}:{port}"))


def client_lines(server: MlflowServer, postgres: Postgres, public: str) -> str:
    optuna = postgres.url("optuna", host=public)
    return (f"MLflow: http://{public}:{server.port} (UI and API; artifacts go through it)\n"
            f"On every client machine (pip install 'cifarlab[server]'):\n"
            f"  export MLFLOW_TRACKING_URI=http://{public}:{server.port}\n"
            f"  python -m training.tune ... --storage '{optuna}'\n"
            f"The password is in {postgres.password_file}; keep the storage URL private.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.servers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("servers"),
                        help="where PostgreSQL's data and the artifacts live (default: servers)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 for other machines")
    parser.add_argument("--public-host", default=None,
                        help="the name clients reach this host by (default: its hostname)")
    parser.add_argument("--port", type=int, default=5000, help="MLflow's port")
    parser.add_argument("--pg-port", type=int, default=5432, help="PostgreSQL's port")
    args = parser.parse_args(argv)
    public = args.public_host or (socket.getfqdn() if args.host != "127.0.0.1" else "127.0.0.1")
    postgres = Postgres(args.dir / "postgres", args.pg_port, args.host)
    try:
        check_driver(f"postgresql://{ROLE}@localhost/mlflow")
        postgres.start()
    except (ServerError, DriverMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = MlflowServer(postgres.url("mlflow"), args.dir / "artifacts", args.port, args.host,
                          team_hosts(public, args.port))
    try:
        server.start()
        print(client_lines(server, postgres, public), flush=True)
        # blocked only now: the servers started above must not inherit a blocked SIGTERM
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        print("stopping the servers", flush=True)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
