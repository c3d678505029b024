import pytest

from training.engine.config import ConfigError, parse_args, read_config_file, resolve
from training.engine.models import MODELS


def test_the_models_recipe_replaces_the_general_defaults():
    cfg = resolve({"model": "mlp"})
    assert cfg.optimizer == "adam" and cfg.batch_size == 512


def test_the_fine_tuning_recipe_applies_when_pretrained_weights_are_used():
    assert resolve({"model": "vgg16", "weights": "imagenet"}).lr == pytest.approx(1e-3)
    assert resolve({"model": "vgg16"}).lr == pytest.approx(1e-2)


def test_config_file_overrides_the_recipe_and_flags_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "mlp"\nlr = 0.01\nbatch-size = 64\n')
    cfg, _ = parse_args(["--config", str(path), "--lr", "0.02"])
    assert (cfg.model, cfg.lr, cfg.batch_size) == ("mlp", 0.02, 64)


def test_yaml_config_files_are_read(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: cnn\naugment: false\nepochs: 5\n")
    cfg, _ = parse_args(["--config", str(path)])
    assert cfg.augment is False and cfg.epochs == 5


def test_unknown_setting_in_a_config_file_lists_the_valid_ones(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("learning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'.*lr"):
        read_config_file(path)


def test_wrongly_typed_setting_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="epochs must be int"):
        read_config_file(path)


@pytest.mark.parametrize("setting, message", [
    ({"lr": -0.1}, "lr must be a positive number"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"val_fraction": 1.5}, "val_fraction must be in \\[0, 1\\)"),
    ({"label_smoothing": 1.0}, "label_smoothing must be in"),
    ({"weight_decay": -1.0}, "weight_decay must not be negative"),
    ({"optimizer": "lbfgs"}, "optimizer = 'lbfgs' is not one of sgd, adam, adamw"),
])
def test_invalid_values_are_refused_with_what_is_allowed(setting, message):
    with pytest.raises(ConfigError, match=message):
        resolve(setting)


def test_boolean_flags_have_a_negative_form():
    cfg, _ = parse_args(["--no-augment", "--no-channels-last"])
    assert cfg.augment is False and cfg.channels_last is False


def test_list_models_needs_no_other_settings():
    cfg, args = parse_args(["--list-models"])
    assert cfg is None and args.list_models


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/*")))
def test_the_shipped_example_configs_are_valid(path):
    cfg, _ = parse_args(["--config", str(path)])
    assert cfg.model


def ruled_fields():
    from dataclasses import fields

    from training.tune import TuneConfig
    return [f for f in fields(TuneConfig) if {"min", "positive"} & set(f.metadata)]


@pytest.mark.parametrize("field", ruled_fields(), ids=lambda f: f.name)
def test_every_range_rule_in_a_fields_metadata_is_enforced(field):
    from training.engine.config import setting_types
    from training.tune import TuneConfig

    low = 0 if field.metadata.get("positive") else field.metadata["min"]
    just_below = low - 1 if setting_types(TuneConfig)[field.name] is int else low - 1e-6
    with pytest.raises(ConfigError, match=f"^{field.name} must"):
        resolve({field.name: just_below}, cls=TuneConfig)


def test_setting_types_come_from_the_dataclass_optional_or_not():
    from training.engine.config import setting_types
    kinds = setting_types()
    assert (kinds["epochs"], kinds["image_size"], kinds["lr"]) == (int, int, float)
    assert (kinds["augment"], kinds["register"], kinds["resume"]) == (bool, str, str)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_models_recipes_name_real_settings_of_the_right_type(model):
    resolve({"model": model})
    resolve({"model": model, "weights": "imagenet"})


def test_a_typo_in_a_recipe_is_an_error_naming_the_model_and_the_key(monkeypatch):
    monkeypatch.setitem(MODELS["cnn"].recipe, "learning_rate", 0.1)
    with pytest.raises(ConfigError, match="cnn recipe: unknown setting 'learning_rate'"):
        resolve({"model": "cnn"})


def test_a_recipe_value_of_the_wrong_type_is_an_error_naming_it(monkeypatch):
    monkeypatch.setitem(MODELS["cnn"].recipe, "epochs", "ten")
    with pytest.raises(ConfigError, match="cnn recipe: epochs must be int"):
        resolve({"model": "cnn"})


def test_no_register_is_a_switch_with_no_negative_form():
    cfg, _ = parse_args(["--no-register"])
    assert cfg.no_register is True
    with pytest.raises(SystemExit):
        parse_args(["--no-no-register"])


def test_a_runs_config_yaml_is_a_config_file_for_a_new_run(tmp_path):
    import yaml

    from training.engine.config import RESOLVED_PRECISION, TrainConfig

    recorded = {**TrainConfig(model="cnn", epochs=3).public_dict(), RESOLVED_PRECISION: "fp32"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(recorded))
    settings = read_config_file(path)
    assert settings["epochs"] == 3 and RESOLVED_PRECISION not in settings


@pytest.mark.parametrize("value", ["pets", "pets/v3", "/3", "pets/3/4", "../x/1"])
def test_improves_on_must_name_a_registered_version(value):
    with pytest.raises(ConfigError, match="name a registered version as NAME/VERSION"):
        parse_args(["--improves-on", value])
