"""A team's servers on one host, on the existing engines: PostgreSQL (Debian's `postgresql`
package) with one database for MLflow and one for Optuna, and `mlflow server` on it with
proxied artifacts, so clients need no shared disk, and MLflow's basic-auth app, so only the
team's accounts can read or write.

    python -m training.servers --dir servers --host 0.0.0.0     # or: make servers
    python -m training.servers add-user alice --permission EDIT --dir servers

Prints what every client exports, then runs until Ctrl-C. The tests start the same servers
on 127.0.0.1 through this module.

Who can do what: the `admin` account (password generated, in `DIR/auth/admin-password`)
everything; members with EDIT train, register and move `champion`; members with READ browse
and classify. PostgreSQL's superuser `cifarlab` connects only from this host (the socket is in
a 0700 folder, every connection needs its password); other machines reach only the Optuna
database, as the `optuna` role that owns nothing else.
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
import warnings
from pathlib import Path
from urllib.parse import quote

from shared.command import run_command
from shared.messages import BadInput, brief
from shared.store import check_driver

ROLE = "cifarlab"  # PostgreSQL's superuser: the MLflow server's own databases, from this host
TUNER = "optuna"  # the role (and its database) that other machines' tuners connect as
DATABASES = ("mlflow", "mlflow_auth", TUNER)
ADMIN = "admin"  # the MLflow account that manages the team's accounts
EDITORS = "editors"  # the MLflow role that EDIT members hold
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServerError(BadInput):
    """A server that cannot be installed, set up or started; the message says what to do."""


def write_secret(path: Path, owner: str | None = None) -> str:
    """A new random secret in `path` (0600, and owned by `owner` when running as root), unless
    one is there; returns it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(18) + "\n")
    if owner and os.geteuid() == 0:
        shutil.chown(path, owner, owner)
    return path.read_text().strip()


def without_password(url: str) -> tuple[str, str | None]:
    """`postgresql://user:PW@host/db` -> (`postgresql://user@host/db`, PW): the password goes
    to a server through its environment (PGPASSWORD), which other accounts cannot read, never
    through its command line, which they can (/proc/PID/cmdline)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None or not parts.scheme.startswith("postgresql"):
        return url, None
    netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), unquote(parts.password)


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
    Every connection needs a password, the socket included, and the socket's folder is the
    server's alone (0700): no other local account reaches the superuser. The superuser
    `cifarlab` (password in `folder`/password, 0600) connects from this host only; when
    `listen` is not loopback, other machines may connect to the `optuna` database as the
    `optuna` role (password in `folder`/optuna-password). The access rules are rewritten on
    every start, so they follow `listen`."""

    def __init__(self, folder: Path, port: int = 5432, listen: str = "127.0.0.1"):
        self.folder, self.port, self.listen = folder.resolve(), port, listen
        self.data, self.log = self.folder / "data", self.folder / "postgres.log"
        self.socket = self.folder / "socket"
        self.password_file = self.folder / "password"
        self.tuner_password_file = self.folder / "optuna-password"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, database: str, host: str = "127.0.0.1") -> str:
        return (f"postgresql://{ROLE}:{quote(self.password, safe='')}@{host}:{self.port}/"
                f"{database}")

    def tuner_url(self, host: str, password: bool = True) -> str:
        """The Optuna storage URL other machines use (with `password=False`, the URL to print:
        clients set PGPASSWORD from the password file instead)."""
        secret = f":{quote(self.tuner_password_file.read_text().strip(), safe='')}" if password else ""
        return f"postgresql://{TUNER}{secret}@{host}:{self.port}/{TUNER}"

    def _run(self, *command: str) -> str:
        done = subprocess.run(as_database_user(list(command)), capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerError(f"{Path(command[0]).name} failed: {(done.stderr or done.stdout)[-1500:]}")
        return done.stdout

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def init(self) -> None:
        """A new cluster: the superuser with a random password, scram-sha-256 everywhere."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._own(self.folder)
        write_secret(self.password_file, owner="postgres")
        self._run(postgres_tool("initdb"), "-D", str(self.data), "-U", ROLE, "-E", "UTF8",
                  f"--pwfile={self.password_file}", "--auth-local=scram-sha-256",
                  "--auth-host=scram-sha-256")

    def access_rules(self) -> str:
        """pg_hba.conf: the superuser from this host, the tuner role from anywhere when
        listening beyond loopback, all with scram-sha-256 passwords."""
        rules = ["local all all scram-sha-256",
                 "host all all 127.0.0.1/32 scram-sha-256",
                 "host all all ::1/128 scram-sha-256"]
        if self.listen not in LOOPBACK:
            rules += [f"host {TUNER} {TUNER} 0.0.0.0/0 scram-sha-256",
                      f"host {TUNER} {TUNER} ::/0 scram-sha-256"]
        return ("# written by python -m training.servers on every start; edits are replaced\n"
                + "\n".join(rules) + "\n")

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self.init()
        self.folder.chmod(0o700)  # the data, passwords and socket of earlier set-ups included
        self.socket.mkdir(mode=0o700, exist_ok=True)
        self.socket.chmod(0o700)
        self._own(self.socket)
        (self.data / "pg_hba.conf").write_text(self.access_rules())
        options = f"-p {self.port} -c listen_addresses={self.listen} -k {self.socket}"
        self._run(postgres_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o", options, "start")
        for name in DATABASES:
            self.create_database(name)
        self.give_tuner_its_database()

    def create_database(self, name: str, template: str | None = None) -> None:
        """`name`, unless it exists; a copy of `template` when given (one that no one is
        connected to)."""
        import psycopg

        copy = f' TEMPLATE "{template}"' if template else ""
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            if not db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                db.execute(f'CREATE DATABASE "{name}"{copy}')

    def give_tuner_its_database(self) -> None:
        """The `optuna` role: a login with its own password that owns the `optuna` database
        (its tables too, for set-ups from before the role) and may connect to nothing else."""
        import psycopg
        from psycopg import sql

        password = write_secret(self.tuner_password_file, owner="postgres")
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            exists = db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (TUNER,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            db.execute(sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                               "PASSWORD {}").format(sql.Identifier(TUNER), sql.Literal(password)))
            db.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(TUNER), sql.Identifier(TUNER)))
            for name in ("postgres", "template1", *DATABASES):
                if name != TUNER:
                    db.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
                        sql.Identifier(name)))
        with psycopg.connect(self.url(TUNER), autocommit=True) as db:
            owned = db.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON "
                               "n.oid = c.relnamespace WHERE n.nspname = 'public' AND "
                               "c.relkind = 'r' AND pg_get_userbyid(c.relowner) <> %s",
                               (TUNER,)).fetchall()
            for (name,) in owned:
                db.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                    sql.Identifier(name), sql.Identifier(TUNER)))

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


class TeamAuth:
    """MLflow's basic-auth app for a server: its accounts in the `database` (a URL), its files
    in `folder` (0700): the admin's generated password, the session-signing key, the config
    file, and a password file per member added. The secrets reach `mlflow server` through its
    environment, never its command line. The server runs with workspaces (all in the one
    `default` workspace), because without them MLflow lets every account create experiments
    and models, and so register and move `champion` in its own: with them, creating needs the
    workspace grant that only the `editors` role holds; every account reads the workspace
    (`grant_default_workspace_access`, at READ)."""

    def __init__(self, folder: Path, database: str):
        self.folder, self.database = folder.resolve(), database
        self.admin_password_file = self.folder / "admin-password"
        self.config = self.folder / "basic_auth.ini"
        self.url_file = self.folder / "server-url"

    def environment(self) -> dict[str, str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        database, password = without_password(self.database)
        self.config.write_text("[mlflow]\n"
                               "default_permission = READ\n"
                               f"database_uri = {database}\n"
                               f"admin_username = {ADMIN}\n"
                               "grant_default_workspace_access = true\n")
        env = {"MLFLOW_AUTH_CONFIG_PATH": str(self.config),
               "MLFLOW_AUTH_ADMIN_PASSWORD": write_secret(self.admin_password_file),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": write_secret(self.folder / "secret-key")}
        return env | ({"PGPASSWORD": password} if password else {})

    def user_password_file(self, name: str) -> Path:
        return self.folder / "users" / name


class MlflowServer(LocalServer):
    """`mlflow server` on `backend` (a database URL), storing artifacts in `artifacts` and
    serving them to clients over HTTP; it can be stopped and started again. With `auth`, only
    its accounts get in (MLflow's basic-auth app). A password in `backend` is handed over in
    the environment."""

    def __init__(self, backend: str, artifacts: Path, port: int | None = None,
                 host: str = "127.0.0.1", allowed_hosts: str | None = None,
                 auth: TeamAuth | None = None):
        self.backend, self.artifacts = backend, artifacts.resolve()
        self.host, self.port = host, port or free_port()
        self.allowed_hosts, self.auth = allowed_hosts, auth
        self.log = self.artifacts.parent / f"mlflow-server-{self.port}.log"

    def start(self, timeout: float = 90) -> None:
        backend, password = without_password(self.backend)
        command = [str(Path(sys.executable).with_name("mlflow")), "server",
                   "--backend-store-uri", backend, "--serve-artifacts",
                   "--artifacts-destination", str(self.artifacts), "--host", self.host,
                   "--port", str(self.port), "--workers", "1"]
        env = dict(os.environ)
        if password:
            env["PGPASSWORD"] = password
        if self.allowed_hosts:
            command += ["--allowed-hosts", self.allowed_hosts]
        if self.auth:
            command += ["--app-name", "basic-auth", "--enable-workspaces"]  # see TeamAuth
            env |= self.auth.environment()
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.launch(command, "the MLflow server", timeout, cwd=self.artifacts.parent, env=env)
        if self.auth:
            self.auth.url_file.write_text(self.url + "\n")


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


def public_address(host: str) -> str:
    """The address other machines reach a server listening on `host` by: the host itself, or
    for 0.0.0.0 the address of the interface that routes outward (no packet is sent)."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
            return probe.getsockname()[0]
        except OSError:
            return socket.getfqdn()


def client_lines(server: MlflowServer, postgres: Postgres, public: str) -> str:
    auth = server.auth
    admin = (f"Accounts: {ADMIN} (its password is in {auth.admin_password_file}); add members with\n"
             f"  python -m training.servers add-user NAME --permission EDIT|READ --dir "
             f"{auth.folder.parent}\n") if auth else ""
    login = ("  export MLFLOW_TRACKING_USERNAME=NAME MLFLOW_TRACKING_PASSWORD=...   # the member's\n"
             if auth else "")
    return (f"MLflow: http://{public}:{server.port} (UI and API; artifacts go through it)\n"
            f"{admin}"
            f"On every client machine (pip install 'cifarlab[server]'):\n"
            f"  export MLFLOW_TRACKING_URI=http://{public}:{server.port}\n{login}"
            f"  export PGPASSWORD=...   # the tuner's, from {postgres.tuner_password_file}\n"
            f"  python -m training.tune ... --storage '{postgres.tuner_url(public, password=False)}'\n"
            "Hand passwords over privately; keep them out of command lines and shared files.")


def add_user(folder: Path, name: str, permission: str) -> str:
    """Create MLflow account `name` on the running server of `folder` (or change its
    permission), as the admin; a new account's password goes to a 0600 file. Returns what to
    tell the person who ran it."""
    auth = TeamAuth(folder / "auth", "")
    if not auth.url_file.exists() or not auth.admin_password_file.exists():
        raise ServerError(f"no team server was started with --dir {folder}: start it first "
                          f"(python -m training.servers --dir {folder})")
    warnings.simplefilter("ignore")  # MLflow's server modules warn of Starlette's, on import
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.server.auth.client import AuthServiceClient

    url = auth.url_file.read_text().strip()
    os.environ["MLFLOW_TRACKING_USERNAME"] = ADMIN
    os.environ["MLFLOW_TRACKING_PASSWORD"] = auth.admin_password_file.read_text().strip()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    client = AuthServiceClient(url)
    password_file = auth.user_password_file(name)
    try:
        try:
            client.get_user(name)
            told = f"{name} exists; its permission is now {permission}"
        except RestException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_user(name, write_secret(password_file))
            told = (f"{name} added with {permission} permission; the password is in "
                    f"{password_file} (hand it over privately)")
        role = editors_role(client)
        holds = any(r.id == role.id for r in client.list_user_roles(name))
        if permission == "EDIT" and not holds:
            client.assign_role(name, role.id)
        elif permission == "READ" and holds:
            client.unassign_role(name, role.id)
    except MlflowException as exc:
        raise ServerError(f"the MLflow server at {url} refused: {brief(exc)} (is it running "
                          f"from --dir {folder}?)") from None
    return told


def editors_role(client):
    """The `editors` role of the default workspace: EDIT on every experiment and registered
    model, and USE of the workspace (creating them); created on first use."""
    found = [r for r in client.list_roles("default") if r.name == EDITORS]
    if found:
        return found[0]
    role = client.create_role("default", EDITORS, "train, register and move champion")
    client.add_role_permission(role.id, "experiment", "*", "EDIT")
    client.add_role_permission(role.id, "registered_model", "*", "EDIT")
    client.add_role_permission(role.id, "workspace", "*", "USE")
    return role


def add_user_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.servers add-user",
                                     description="Add a member to the team's MLflow server (it must "
                                                 "be running), or change a member's permission.")
    parser.add_argument("name", help="the member's account name")
    parser.add_argument("--permission", choices=("EDIT", "READ"), default="EDIT",
                        help="EDIT: train, register, move champion; READ: browse and classify")
    parser.add_argument("--dir", type=Path, default=Path("servers"),
                        help="the --dir the servers were started with (default: servers)")
    args = parser.parse_args(argv)
    if not args.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ServerError(f"account names are letters, digits, '-', '_' and '.': {args.name[:60]!r}")
    print(add_user(args.dir, args.name, args.permission))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["add-user"]:
        return run_command(lambda: add_user_main(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m training.servers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("servers"),
                        help="where PostgreSQL's data, the accounts and the artifacts live "
                             "(default: servers)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 for other machines")
    parser.add_argument("--public-host", default=None,
                        help="the name or address clients reach this host by (default: for "
                             "0.0.0.0, the address of the outward interface)")
    parser.add_argument("--port", type=int, default=5000, help="MLflow's port")
    parser.add_argument("--pg-port", type=int, default=5432, help="PostgreSQL's port")
    args = parser.parse_args(argv)
    return run_command(lambda: serve(args))


def serve(args: argparse.Namespace) -> int:
    public = args.public_host or public_address(args.host)
    postgres = Postgres(args.dir / "postgres", args.pg_port, args.host)
    check_driver(f"postgresql://{ROLE}@localhost/mlflow")
    try:
        import flask_wtf  # noqa: F401 - MLflow's basic-auth app needs it
    except ImportError:
        raise ServerError("the team server's sign-in needs Flask-WTF: pip install "
                          "'cifarlab[server]'") from None
    postgres.start()
    server = MlflowServer(postgres.url("mlflow"), args.dir / "artifacts", args.port, args.host,
                          team_hosts(public, args.port),
                          TeamAuth(args.dir / "auth", postgres.url("mlflow_auth")))
    try:
        server.start()
        print(client_lines(server, postgres, public), flush=True)
        # blocked only now: the servers started above must not inherit a blocked SIGTERM
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        print("stopping the servers", flush=True)
    finally:
        server.stop()
        postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
