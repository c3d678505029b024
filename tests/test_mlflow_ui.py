"""The MLflow UI in a real (headless) Chromium: the links training prints open on the runs."""
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from training.train import train

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "mlflow_ui.py"


def test_printed_links_open_the_experiments_runs_and_the_run_page(train_config, tmp_path, capsys):
    if not shutil.which("chromium") and not os.environ.get("CI"):
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    result = train(train_config(epochs=1), log=lambda *_: None)
    spec = importlib.util.spec_from_file_location("mlflow_ui", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "shots"
    assert module.main(["--tracking-uri", train_config().tracking_uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "run: " in printed and result.run_id in printed
    for page in ("experiment", "run"):
        assert (out / f"mlflow-ui-{page}.png").stat().st_size > 10_000
