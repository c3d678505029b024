import pytest

from shared.registry import RegistryError, list_versions, resolve_model_uri


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


def test_an_empty_registry_says_how_to_train(store):
    with pytest.raises(RegistryError, match="no registered model.*training.train"):
        list_versions(store)
