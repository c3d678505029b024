"""What the Model Registry holds, with each version's key facts, for the app and the CLI."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from shared.messages import BadInput, mask_secrets
from shared.onnx_model import EXPORTS, RUNTIMES
from shared.store import CHAMPION, DriverMissing, check_driver

EXPORT_TAG = "export.{}"  # a version's checked export in a runtime: the export's model URI
CHECKS_TAG = "export.{}.checks"  # its checked figures, in words


class RegistryError(BadInput):
    """The store cannot be read, or holds no model; the message says what to do."""


class EmptyRegistry(RegistryError):
    """The store holds no registered model yet."""


@dataclass
class ModelVersionInfo:
    name: str
    version: str
    aliases: list[str]
    run_id: str | None
    created_ms: int = 0
    facts: dict[str, str] = field(default_factory=dict)
    exports: dict[str, str] = field(default_factory=dict)  # runtime: its checked figures

    @property
    def runtimes(self) -> list[str]:
        """pt2, then each runtime a checked export of this version exists for."""
        return ["pt2", *(r for r in EXPORTS if r in self.exports)]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        aliases = f" @{', @'.join(self.aliases)}" if self.aliases else ""
        return f"{self.name} v{self.version}{aliases}"


def _facts(client, run_id: str | None, created_ms: int, tags: dict[str, str]) -> dict[str, str]:
    facts = {"registered": dt.datetime.fromtimestamp(created_ms / 1000).strftime("%Y-%m-%d %H:%M")}
    if tags.get("improves_on"):
        facts["improves on"] = tags["improves_on"]
    if not run_id:
        return facts
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - a deleted or unreadable run leaves the facts short
        return facts
    p, m = run.data.params, run.data.metrics
    facts.update({
        "model": p.get("model", "?"),
        "training": "fine-tuned" if p.get("fine_tuned") == "True" else "from scratch",
        "weights": p.get("weights_source", "?"),
        "device": p.get("device_name", p.get("device", "?")),
        "epochs run": p.get("epochs_run", "?"),
        "test accuracy": f"{m['test_acc']:.2%}" if "test_acc" in m else "?",
        "dataset": run.data.tags.get("dataset", "?"),
        "data folder": p.get("data_dir", ""),
        "frozen pretrained": "yes" if p.get("freeze") == "backbone"
                             and p.get("weights", "none") != "none" else "no",
    })
    return facts


def list_versions(tracking_uri: str) -> list[ModelVersionInfo]:
    """Every registered version, champions first, then newest first."""
    from mlflow.tracking import MlflowClient  # imported here: the app calls this off its UI thread

    try:
        check_driver(tracking_uri)
    except DriverMissing as exc:
        raise RegistryError(str(exc)) from None
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        versions = client.search_model_versions(max_results=1000)
        aliases: dict[tuple[str, str], list[str]] = {}
        for model in client.search_registered_models(max_results=1000):
            for alias, version in (model.aliases or {}).items():
                aliases.setdefault((model.name, str(version)), []).append(alias)
    except Exception as exc:  # noqa: BLE001 - connection and database errors of many kinds
        raise RegistryError(f"cannot read the MLflow store at {mask_secrets(tracking_uri)}: "
                            f"{mask_secrets(str(exc))}. Point the app "
                            "at your store with MLFLOW_TRACKING_URI (or --tracking-uri), or start "
                            "it from the folder whose mlruns/ holds your runs.") from exc
    if not versions:
        raise EmptyRegistry(f"no registered model in {mask_secrets(tracking_uri)} yet. Train one first, e.g. "
                            "`make train` or `python -m training.train --model cnn`, from the folder "
                            "that holds mlruns/, or point MLFLOW_TRACKING_URI at your store.")
    infos = []
    for v in versions:
        infos.append(ModelVersionInfo(v.name, str(v.version),
                                      sorted(aliases.get((v.name, str(v.version)), [])), v.run_id,
                                      v.creation_timestamp or 0,
                                      _facts(client, v.run_id, v.creation_timestamp, v.tags or {}),
                                      exports_of(v.tags or {})))
    infos.sort(key=lambda i: (i.name, CHAMPION not in i.aliases, -int(i.version)))
    return infos


def spec_uri(spec: str) -> str:
    """NAME@ALIAS, NAME/VERSION, NAME (its champion), or a models:/ or runs:/ URI, as a URI."""
    if spec.startswith(("models:/", "runs:/")):
        return spec
    if "@" in spec or "/" in spec:
        return f"models:/{spec}"
    return f"models:/{spec}@{CHAMPION}"


def resolve_model_uri(spec: str | None, tracking_uri: str) -> str:
    """The URI `spec` names (see spec_uri); None: the champion of the newest model."""
    if spec:
        return spec_uri(spec)
    return newest_champion(list_versions(tracking_uri)).uri


def find_version(versions: list[ModelVersionInfo], spec: str) -> int | None:
    """The index of the version `spec` names (by version or by alias), None if none is."""
    uri = spec_uri(spec)
    for i, v in enumerate(versions):
        if uri == v.uri or uri in {f"models:/{v.name}@{a}" for a in v.aliases}:
            return i
    return None


def newest_champion(versions: list[ModelVersionInfo]) -> ModelVersionInfo:
    """The most recently registered champion (or version, if none is champion)."""
    champions = [v for v in versions if CHAMPION in v.aliases] or versions
    return max(champions, key=lambda v: v.created_ms)


def exports_of(tags: dict[str, str]) -> dict[str, str]:
    """A version's checked exports, from its tags: runtime -> its figures in words."""
    return {r: tags.get(CHECKS_TAG.format(r), "checked") for r in EXPORTS
            if tags.get(EXPORT_TAG.format(r))}


def registered_version(model_uri: str, client):
    """The registry's version that `models:/NAME/VERSION` or `models:/NAME@ALIAS` names."""
    spec = model_uri.removeprefix("models:/")
    name, at, alias = spec.partition("@")
    try:
        if at:
            return client.get_model_version_by_alias(name, alias)
        name, _, number = spec.partition("/")
        return client.get_model_version(name, number)
    except Exception as exc:  # noqa: BLE001 - unknown names, aliases, versions
        raise RegistryError(f"no registered model version {spec!r} in this store "
                            f"({mask_secrets(str(exc)).splitlines()[0]}); see the registered "
                            "versions in the MLflow UI's Models page") from None


def version_recipe(tracking_uri: str, model_uri: str, folder: Path) -> Path:
    """The settings (config.yaml) `model_uri`'s run was trained with, downloaded into `folder`:
    a new run started from them trains the same recipe."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = registered_version(model_uri, client)
    try:
        return Path(client.download_artifacts(version.run_id, "config.yaml", str(folder)))
    except Exception as exc:  # noqa: BLE001 - a run without its config, a store gone
        raise RegistryError(f"the run of {model_uri.removeprefix('models:/')} has no readable "
                            f"config.yaml ({type(exc).__name__}); it was not trained by this "
                            "project, so its recipe is unknown: choose a built-in start") from None


def log_to_run(tracking_uri: str, model_uri: str, path: Path, folder: str) -> None:
    """`path` stored as an artifact of `model_uri`'s run, under `folder`."""
    from mlflow.tracking import MlflowClient

    from shared.store import refused_write

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = registered_version(model_uri, client)
    try:
        client.log_artifact(version.run_id, str(path), folder)
    except Exception as exc:  # noqa: BLE001 - a read-only account, a store gone
        refused = refused_write(exc)
        raise RegistryError(refused or f"cannot store {path.name} with the run of "
                            f"{model_uri.removeprefix('models:/')}: "
                            f"{mask_secrets(str(exc)).splitlines()[0]}") from None


def runtime_uri(model_uri: str, runtime: str) -> str:
    """The model to load for `model_uri` in `runtime`: the version itself for pt2, else the
    checked export its tags link to. RegistryError says how to make a missing one."""
    if runtime not in RUNTIMES:
        raise RegistryError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "pt2":
        return model_uri
    if not model_uri.startswith("models:/") or model_uri.startswith("models:/m-"):
        raise RegistryError(f"--runtime {runtime} needs a registered version (NAME@ALIAS or "
                            f"NAME/VERSION), not {model_uri}")
    from mlflow.tracking import MlflowClient

    version = registered_version(model_uri, MlflowClient())
    linked = (version.tags or {}).get(EXPORT_TAG.format(runtime))
    if not linked:
        raise RegistryError(f"{version.name} version {version.version} has no checked {runtime} "
                            f"export: make one with python -m training.export --model "
                            f"{version.name}/{version.version} --format {runtime}, or use "
                            "--runtime pt2")
    return linked
