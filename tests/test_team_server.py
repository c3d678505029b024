"""The team's servers as `python -m training.servers` starts them, tried as an outsider, a
read-only member and another local account would: only the team's accounts get in, READ
members cannot move `champion` or write artifacts, no password is on a command line, and
PostgreSQL's superuser is out of reach of other accounts."""
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from training.servers import Postgres, free_port, postgres_tool, public_address

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def team(postgres, image_folder):
    """`python -m training.servers` on private ports, in a folder the postgres account can
    reach, with the members alice (EDIT) and bob (READ); stopped with Ctrl-C's signal."""
    folder = Path(tempfile.mkdtemp(prefix="cifarlab-team-"))
    folder.chmod(0o755)
    port, pg_port = free_port(), free_port()
    servers = subprocess.Popen([sys.executable, "-m", "training.servers", "--dir",
                                str(folder / "servers"), "--port", str(port), "--pg-port",
                                str(pg_port)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    printed = [servers.stdout.readline() for _ in range(9)]
    assert printed[0].startswith("MLflow: http://127.0.0.1:"), "".join(printed)
    for name, permission in (("alice", "EDIT"), ("bob", "READ")):
        added = servers_command("add-user", name, "--permission", permission, "--dir",
                                str(folder / "servers"))
        assert added.returncode == 0 and "added" in added.stdout, added.stderr
    yield {"url": f"http://127.0.0.1:{port}", "dir": folder / "servers", "pg_port": pg_port,
           "pid": servers.pid, "printed": "".join(printed), "images": image_folder}
    servers.send_signal(signal.SIGINT)
    assert servers.wait(timeout=60) == 0
    subprocess.run(["rm", "-rf", str(folder)])


def servers_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.servers", *args], cwd=ROOT,
                          capture_output=True, text=True)


def account(team, name: str) -> dict[str, str]:
    password = (team["dir"] / "auth" / ("admin-password" if name == "admin" else f"users/{name}"))
    return {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": password.read_text().strip()}


def command(team, module: str, *args: str, who: dict | None = None, cwd: Path = ROOT):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run([sys.executable, "-m", module, *args, "--tracking-uri", team["url"]],
                          cwd=cwd, env=env | (who or {}), capture_output=True, text=True,
                          timeout=300)


def train_as(team, who: dict, tmp_path: Path):
    return command(team, "training.train", "--model", "mlp", "--data-dir", str(team["images"]),
                   "--epochs", "1", "--batch-size", "16", "--no-progress", "--no-system-metrics",
                   "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), who=who,
                   cwd=tmp_path)


def as_member(monkeypatch, team, name: str) -> MlflowClient:
    for key, value in account(team, name).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return MlflowClient(team["url"], registry_uri=team["url"])


def test_only_the_teams_accounts_get_in_and_read_members_cannot_move_champion_or_write(
        team, tmp_path, monkeypatch):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{team['url']}/api/2.0/mlflow/registered-models/search")
    assert refused.value.code == 401

    trained = train_as(team, account(team, "alice"), tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "now champion" in trained.stdout

    bob = as_member(monkeypatch, team, "bob")
    (model,) = bob.search_registered_models()
    version = bob.get_model_version_by_alias(model.name, "champion")
    forged = tmp_path / "model.pt2"
    forged.write_bytes(b"not the model")
    for attempt in (lambda: bob.set_registered_model_alias(model.name, "champion", version.version),
                    lambda: bob.set_model_version_tag(model.name, version.version, "best_val_acc", "1"),
                    lambda: bob.log_artifact(version.run_id, str(forged), "model/data"),
                    lambda: bob.delete_registered_model(model.name),
                    lambda: bob.create_experiment("squatted")):
        with pytest.raises(Exception, match="403|Forbidden|Permission denied"):
            attempt()

    refused_training = train_as(team, account(team, "bob"), tmp_path)
    assert refused_training.returncode == 2
    assert refused_training.stderr.strip().splitlines() == [
        "error: the tracking server lets 'bob' read but not write here: ask its admin for EDIT "
        "permission (python -m training.servers add-user bob --permission EDIT)"]
    classified = command(team, "gui.classify", "--model", f"{model.name}@champion",
                         str(next((team["images"] / "test").iterdir())), who=account(team, "bob"))
    assert classified.returncode == 0, classified.stderr[-2000:]


@pytest.mark.parametrize("who, says", [
    ({}, "asks who you are: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ({"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "guess"},
     "refused the account 'bob': wrong name or password"),
])
def test_a_command_without_the_right_account_says_so_in_one_line(team, who, says):
    done = command(team, "training.compare", who=who)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert says in line and "Traceback" not in done.stderr


def test_no_password_is_on_a_command_line_or_the_console(team):
    secrets = [(team["dir"] / "postgres" / name).read_text().strip()
               for name in ("password", "optuna-password")]
    secrets.append((team["dir"] / "auth" / "admin-password").read_text().strip())
    secrets += [p.read_text().strip() for p in (team["dir"] / "auth" / "users").iterdir()]
    command_lines = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command_lines.append((proc / "cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                continue
    assert any("mlflow" in line and "server" in line for line in command_lines)
    for secret in secrets:
        assert not any(secret in line for line in command_lines)
        assert secret not in team["printed"]
    assert "postgresql://optuna@127.0.0.1:" in team["printed"]
    for private in (team["dir"] / "auth", team["dir"] / "postgres"):
        assert private.stat().st_mode & 0o077 == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as the nobody account")
def test_another_local_account_cannot_reach_the_database(team):
    psql = postgres_tool("psql")
    socket = team["dir"] / "postgres" / "socket"
    tries = {"socket": ["-h", str(socket)], "tcp": ["-h", "127.0.0.1"]}
    for how, where in tries.items():
        done = subprocess.run(["runuser", "-u", "nobody", "--", psql, *where, "-p",
                               str(team["pg_port"]), "-U", "cifarlab", "-d", "mlflow", "-w",
                               "-c", "SELECT 1"], capture_output=True, text=True,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert done.returncode != 0, how
        assert ("Permission denied" if how == "socket" else "no password supplied") in done.stderr
    tuner = (team["dir"] / "postgres" / "optuna-password").read_text().strip()
    done = subprocess.run([psql, "-h", "127.0.0.1", "-p", str(team["pg_port"]), "-U", "optuna",
                           "-d", "mlflow", "-w", "-c", "SELECT 1"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PGPASSWORD": tuner})
    assert done.returncode != 0 and "CONNECT" in done.stderr


def test_the_remote_rules_follow_host_on_every_start(postgres):
    folder = Path(tempfile.mkdtemp(prefix="cifarlab-hba-"))
    folder.chmod(0o755)
    port = free_port()
    try:
        for listen, remote in (("127.0.0.1", False), ("0.0.0.0", True), ("127.0.0.1", False)):
            cluster = Postgres(folder / "postgres", port, listen)
            cluster.start()
            rules = (cluster.data / "pg_hba.conf").read_text()
            cluster.stop()
            assert ("host optuna optuna 0.0.0.0/0 scram-sha-256" in rules) is remote
            assert "trust" not in rules and "host all all 0.0.0.0/0" not in rules
    finally:
        subprocess.run(["rm", "-rf", str(folder)])


def test_clients_are_told_a_reachable_address_for_a_server_on_every_interface():
    assert public_address("0.0.0.0") not in ("0.0.0.0", "::", "")
    assert public_address("10.1.2.3") == "10.1.2.3"


def test_adding_a_member_before_the_servers_ever_started_is_one_line(tmp_path):
    done = servers_command("add-user", "carol", "--dir", str(tmp_path / "none"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no team server was started with --dir {tmp_path / 'none'}: start it first "
        f"(python -m training.servers --dir {tmp_path / 'none'})"]
