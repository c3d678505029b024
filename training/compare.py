"""Compare tracked runs the way the seed studies did, as one table and two figures.

    python -m training.compare --experiment training
    python -m training.compare --filter "params.model = 'vgg16'" --out reports/vgg16
    python -m training.compare --runs 2e53...,adc7...

Selects runs from the store (by experiments, run ids or an MLflow filter), builds the table
(model, scratch or fine-tuned, frozen layers, parameters, epochs and where early stopping
stopped, best and final accuracy and loss, test accuracy, training time, device), a figure of
their validation curves and one of accuracy against training time. Writes markdown, CSV and
PNGs to --out, prints the markdown, and logs everything as artifacts of a comparison run.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are files: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from shared.command import run_command
from shared.messages import BadInput
from shared.store import tracking_uri, ui_command, use_store

COLUMNS = ["run", "name", "kind", "model", "dataset", "training", "frozen", "trainable_params",
           "total_params", "epochs_run", "stopped_at", "best_train_acc", "final_train_acc", "best_val_acc",
           "final_val_acc", "best_train_loss", "final_train_loss", "best_val_loss", "final_val_loss",
           "test_acc", "ece", "train_seconds",
           "seconds_per_epoch", "device", "status"]


class CompareError(BadInput):
    """Nothing to compare, or a selection that cannot be read."""


def select_runs(client, experiments: list[str], run_ids: list[str], filter_string: str) -> list:
    """Training and evaluation runs (those with a `model` param) matching the selection,
    oldest first."""
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except Exception as exc:  # noqa: BLE001 - unknown id, store error
                raise CompareError(f"run {run_id!r} cannot be read: {exc}") from exc
    else:
        if experiments:
            found = [client.get_experiment_by_name(name) for name in experiments]
            missing = [n for n, e in zip(experiments, found) if e is None]
            if missing:
                raise CompareError(f"no experiment named {', '.join(missing)}; experiments in "
                                   f"this store: {', '.join(e.name for e in client.search_experiments())}")
            ids = [e.experiment_id for e in found]
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        try:
            runs = client.search_runs(ids, filter_string, max_results=1000)
        except Exception as exc:  # noqa: BLE001 - a malformed filter
            raise CompareError(f"the filter {filter_string!r} cannot be used: {exc}") from exc
    runs = [r for r in runs if "model" in r.data.params]
    if not runs:
        where = f"filter {filter_string!r}" if filter_string else "selection"
        raise CompareError(f"no training or evaluation run matches the {where}; list what is there with "
                           "`mlflow ui` or widen the selection")
    return sorted(runs, key=lambda r: r.info.start_time)


def _history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def comparison_row(client, run) -> dict:
    """One row; a value the run did not log is an empty string."""
    p, m = run.data.params, run.data.metrics
    history = {key: _history(client, run.info.run_id, key)
               for key in ("train_acc", "train_loss", "val_loss", "epoch_seconds")}
    train_acc, epoch_seconds = history["train_acc"], history["epoch_seconds"]
    stop = p.get("stop_epoch", "")
    return {
        "run": run.info.run_id[:8],
        "name": run.info.run_name or "",
        "kind": run.data.tags.get("kind", "training"),
        "model": p.get("model", ""),
        "dataset": p.get("dataset", run.data.tags.get("dataset", "")),
        "training": {"True": "fine-tuned", "False": "scratch"}.get(p.get("fine_tuned", ""), ""),
        "frozen": p.get("frozen_layers", ""),
        "trainable_params": p.get("trainable_params", ""),
        "total_params": p.get("total_params", ""),
        "epochs_run": p.get("epochs_run", run.data.tags.get("epochs_run", "")),
        "stopped_at": "" if stop in ("", "none") else stop,
        "best_train_acc": max(train_acc) if train_acc else "",
        "final_train_acc": m.get("train_acc", ""),
        "best_val_acc": m.get("best_val_acc", ""),
        "final_val_acc": m.get("val_acc", ""),
        "best_train_loss": min(history["train_loss"]) if history["train_loss"] else "",
        "final_train_loss": m.get("train_loss", ""),
        "best_val_loss": min(history["val_loss"]) if history["val_loss"] else "",
        "final_val_loss": m.get("val_loss", ""),
        "test_acc": m.get("test_acc", m.get("accuracy", "")),
        "ece": m.get("ece", ""),
        "train_seconds": m.get("train_seconds", ""),
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else "",
        "device": p.get("device_name", p.get("device", "")),
        "status": run.info.status,
    }


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:,.1f}"
    return str(value)


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def curves_figure(client, runs, rows):
    fig, ax = plt.subplots(figsize=(9, 5))
    for run, row in zip(runs, rows):
        values = _history(client, run.info.run_id, "val_acc")
        if values:
            ax.plot(range(1, len(values) + 1), values, marker=".", label=f"{row['name']} ({row['run']})")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def time_figure(rows):
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        accuracy = row["test_acc"] if row["test_acc"] != "" else row["best_val_acc"]
        if row["train_seconds"] == "" or accuracy == "":
            continue
        ax.scatter(row["train_seconds"], accuracy, s=40)
        ax.annotate(f"{row['name']} ({row['run']})", (row["train_seconds"], accuracy), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="training time (s)", ylabel="test accuracy (best validation if untested)",
           title="accuracy against training time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def compare(uri: str, experiments: list[str], run_ids: list[str], filter_string: str,
            out: Path, experiment: str = "comparisons") -> tuple[list[dict], str]:
    """Build, write and log the comparison. Returns (rows, comparison run id)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking.publish import ensure_experiment

    use_store(uri)
    client = MlflowClient(uri)
    runs = select_runs(client, experiments, run_ids, filter_string)
    rows = [comparison_row(client, run) for run in runs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(to_markdown(rows))
    (out / "comparison.csv").write_text(to_csv(rows))
    for name, fig in (("val_curves.png", curves_figure(client, runs, rows)),
                      ("accuracy_vs_time.png", time_figure(rows))):
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    with mlflow.start_run(experiment_id=ensure_experiment(experiment, uri),
                          run_name=f"compare-{len(rows)}-runs") as run:
        mlflow.set_tags({"compared_runs": ",".join(r.info.run_id for r in runs),
                         "selection": filter_string or ",".join(experiments or run_ids) or "all"})
        mlflow.log_artifacts(str(out))
    return rows, run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", action="append", default=[],
                        help="experiment to take runs from (repeatable; default: all)")
    parser.add_argument("--runs", default="", help="comma-separated run ids (instead of a search)")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. "
                                                      "\"params.model = 'cnn'\"")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the report (default: reports/compare-<time>)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, "
                                               "else ./mlruns)")
    args = parser.parse_args(argv)
    out = args.out or Path("reports") / time.strftime("compare-%Y%m%d-%H%M%S")
    uri = tracking_uri(args.tracking_uri)

    def body() -> int:
        rows, run_id = compare(uri, args.experiment, [r for r in args.runs.split(",") if r],
                               args.filter, out)
        print(to_markdown(rows))
        print(f"{len(rows)} runs compared; report in {out}/ and in comparison run {run_id} "
              f"(see it: {ui_command(uri)})")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
