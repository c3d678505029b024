import pytest

from shared.registry import RegistryError, find_version, list_versions, resolve_model_uri


def test_versions_carry_their_aliases_and_run_facts(registered_store):
    versions = list_versions(registered_store)
    assert [(v.name, v.version, v.aliases) for v in versions] == [
        ("tiny-cnn", "1", ["champion"]), ("tiny-cnn", "2", [])]
    facts = versions[0].facts
    assert facts["model"] == "cnn" and facts["training"] == "from scratch"
    assert facts["epochs run"] == "2" and facts["dataset"] == "tiny"


@pytest.mark.parametrize("spec, uri", [
    ("tiny-cnn", "models:/tiny-cnn@champion"),
    ("tiny-cnn@champion", "models:/tiny-cnn@champion"),
    ("tiny-cnn/2", "models:/tiny-cnn/2"),
    (None, "models:/tiny-cnn/1"),  # the newest champion
])
def test_model_specs_resolve_to_registry_uris(registered_store, spec, uri):
    assert resolve_model_uri(spec, registered_store) == uri


@pytest.mark.parametrize("spec, index", [
    ("tiny-cnn", 0), ("tiny-cnn@champion", 0), ("models:/tiny-cnn/2", 1), ("tiny-cnn/2", 1),
    ("tiny-cnn/7", None), ("other@champion", None),
])
def test_a_spec_finds_the_version_it_names_by_number_or_alias(registered_store, spec, index):
    assert find_version(list_versions(registered_store), spec) == index


def test_an_empty_registry_says_how_to_train(store):
    with pytest.raises(RegistryError, match="no registered model.*training.train"):
        list_versions(store)


def champion(uri, name):
    from mlflow.tracking import MlflowClient
    return str(MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(name, "champion").version)


def test_runs_registering_at_the_same_moment_leave_the_best_one_champion(registered,
                                                                           registered_store,
                                                                           monkeypatch):
    import random
    import threading
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking.publish import register_version

    _, result = registered
    mlflow.set_tracking_uri(registered_store)
    mlflow.set_registry_uri(registered_store)
    real_set_alias = MlflowClient.set_registered_model_alias

    def slow_set_alias(self, *args):  # a store that answers slowly widens every race window
        time.sleep(random.uniform(0, 0.3))
        return real_set_alias(self, *args)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", slow_set_alias)
    scores = [0.31, 0.72, 0.55, 0.64, 0.18, 0.47]
    start, outcomes = threading.Barrier(len(scores)), {}

    def register(score):
        start.wait()
        try:
            outcomes[score] = register_version(result.model_uri, "raced", score)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcomes[score] = exc

    threads = [threading.Thread(target=register, args=(s,)) for s in scores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [o for o in outcomes.values() if isinstance(o, Exception)], outcomes
    assert sorted(int(v) for v, _ in outcomes.values()) == [1, 2, 3, 4, 5, 6]
    best_version, promoted = outcomes[max(scores)]
    assert promoted and champion(registered_store, "raced") == best_version


def test_a_champion_chosen_by_hand_stays_until_a_new_version_beats_it(registered,
                                                                      registered_store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking.publish import register_version

    _, result = registered
    mlflow.set_tracking_uri(registered_store)
    mlflow.set_registry_uri(registered_store)
    register_version(result.model_uri, "picked", 0.9)
    register_version(result.model_uri, "picked", 0.5)
    MlflowClient().set_registered_model_alias("picked", "champion", "2")  # a user's choice
    assert register_version(result.model_uri, "picked", 0.6) == ("3", True)  # beats 0.5, not 0.9
    assert register_version(result.model_uri, "picked", 0.55) == ("4", False)
    assert champion(registered_store, "picked") == "3"
