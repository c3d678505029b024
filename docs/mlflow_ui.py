"""The MLflow UI on a store, in a real browser: starts `mlflow ui` on 127.0.0.1, opens an
experiment in headless Chromium (Debian: `apt-get install chromium`) the plain way and through
the link training prints (its runs, model-training view), then one run's page; saves a
screenshot of each and says what each shows.

    python docs/mlflow_ui.py --tracking-uri sqlite:///mlruns/mlflow.db --experiment training \
        --out docs/images

Exit status 1 if the printed links do not show the run. The plain experiment URL is reported,
not required: MLflow 3.17's UI chooses between its GenAI and model-training views per browser.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow.tracking import MlflowClient  # noqa: E402

from shared.store import tracking_uri, ui_page, use_store  # noqa: E402
from training.servers import MlflowServer, free_port  # noqa: E402


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("no Chromium found: on Debian or Ubuntu `apt-get install chromium`")


def browse(url: str, screenshot: Path, profile: Path, width: int = 1440, height: int = 900) -> str:
    """The page's DOM once its scripts have run, and a screenshot of it."""
    common = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}",
              "--virtual-time-budget=20000"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], check=True, capture_output=True,
                   timeout=180)
    return subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True,
                          timeout=180).stdout


class UiServer(MlflowServer):
    """`mlflow ui` (the server without --serve-artifacts) on a store, on 127.0.0.1."""

    def start(self, timeout: float = 90) -> None:
        self.launch([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri",
                     self.backend, "--host", "127.0.0.1", "--port", str(self.port)],
                    "mlflow ui", timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default="training")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args(argv)
    uri = tracking_uri(args.tracking_uri)
    use_store(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {uri}")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                              max_results=1)
    if not runs:
        raise SystemExit(f"experiment {args.experiment!r} has no finished run to show")
    run = runs[0]
    args.out.mkdir(parents=True, exist_ok=True)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        server = UiServer(uri, Path(tmp) / "artifacts", port=free_port())
        server.start()
        try:
            plain = f"{server.url}/#/experiments/{experiment.experiment_id}"
            pages = {"experiment-plain": (plain, False),
                     "experiment": (f"{server.url}/{ui_page(experiment.experiment_id)}", True),
                     "run": (f"{server.url}/{ui_page(experiment.experiment_id, run.info.run_id)}", True)}
            for page, (url, required) in pages.items():
                shot = args.out / f"mlflow-ui-{page}.png"
                dom = browse(url, shot, Path(tmp) / "profile")
                shows = run.info.run_name in dom
                what = (f"shows run {run.info.run_name!r}" if shows else
                        "opens on the GenAI overview (traces)" if "Detect Issues" in dom
                        else f"does NOT show run {run.info.run_name!r}")
                print(f"{page}: {url} -> {shot}: {what}")
                if required and not shows:
                    failures.append(page)
        finally:
            server.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
