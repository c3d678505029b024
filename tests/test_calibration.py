"""Calibrated confidence and the unsure flag: chosen on validation data, stored with the model,
applied by every consumer."""
import csv
import io

import mlflow
import numpy as np
import pytest
import torch

from gui.export import write_csv
from shared.calibration import (
    Calibration,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    unsure_threshold,
)
from shared.inference import LoadedClassifier, Prediction, load_classifier
from shared.preprocess import Preprocessing
from shared.safe_model import UnsafeModel, check_calibration
from training.train import train


def quiet(*_):
    pass


def overconfident(n=4000, classes=10, scale=3.0, seed=0):
    """Labels drawn from softmax(z), scores z * scale: the temperature that undoes it is scale."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z * scale, labels


def test_fitted_temperature_undoes_overconfidence():
    logits, labels = overconfident(scale=3.0)
    assert fit_temperature(logits, labels) == pytest.approx(3.0, rel=0.1)


def test_temperature_scaling_lowers_the_calibration_error_and_keeps_every_answer():
    logits, labels = overconfident()
    calibration, figures = calibrate(logits, labels)
    assert figures["val_ece"] < figures["val_ece_before_temperature"] / 3
    assert torch.equal((logits / calibration.temperature).argmax(1), logits.argmax(1))


def test_calibration_error_is_zero_when_confidence_matches_accuracy():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1, 0])) == 0.0
    assert expected_calibration_error(probs, torch.tensor([1, 1, 0])) == pytest.approx(1 / 3)


def test_unsure_threshold_lets_the_chosen_share_of_in_domain_images_through():
    probs = torch.softmax(torch.randn(1000, 5, generator=torch.Generator().manual_seed(1)) * 3, 1)
    threshold = unsure_threshold(probs, keep=0.95)
    assert (probs.max(1).values >= threshold).float().mean() == pytest.approx(0.95, abs=0.002)


def test_a_model_logged_before_calibration_is_never_unsure():
    calibration = Calibration.from_dict(None)
    assert calibration.temperature == 1.0 and not calibration.unsure(0.01)


@pytest.mark.parametrize("bad", [{"temperature": 0}, {"temperature": "nan"},
                                 {"temperature": 1, "unsure_below": 1.5}, ["not", "a", "mapping"]])
def test_malformed_calibration_metadata_is_refused(bad):
    with pytest.raises(UnsafeModel, match="calibration"):
        check_calibration({"calibration": bad})


def test_training_logs_temperature_and_unsure_rule_and_the_model_applies_them(train_config):
    result = train(train_config(), log=quiet)
    run = mlflow.get_run(result.run_id)
    calibration = result.calibration
    assert float(run.data.params["temperature"]) == pytest.approx(calibration.temperature, abs=1e-4)
    assert run.data.params["unsure_rule"].startswith("max_softmax_probability < ")
    assert {"val_ece", "val_ece_before_temperature", "unsure_below"} <= set(run.data.metrics)
    loaded = load_classifier(result.model_uri)
    assert loaded.calibration.temperature == pytest.approx(calibration.temperature)
    assert loaded.calibration.unsure_below == pytest.approx(calibration.unsure_below)
    assert loaded.calibration.source.startswith("validation (")


def test_without_a_validation_split_no_temperature_and_no_unsure_flag(train_config):
    result = train(train_config(val_fraction=0, patience=0), log=quiet)
    assert mlflow.get_run(result.run_id).data.params["unsure_rule"] == "none (no validation split)"
    loaded = load_classifier(result.model_uri)
    assert loaded.calibration.temperature == 1.0 and loaded.calibration.unsure_below is None


def test_an_answer_under_the_threshold_is_flagged_unsure():
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # top probabilities 0.79 and 0.36
    clf = LoadedClassifier("test", lambda x: scores, ["cat", "dog", "ship"],
                           Preprocessing(32, 32, (0.5,) * 3, (0.25,) * 3), Calibration(1.0, 0.5))
    predictions = clf.predict(["sure.png", "unsure.png"], np.zeros((2, 3, 32, 32), np.uint8))
    assert [p.unsure for p in predictions] == [False, True]
    assert predictions[1].label == "cat"


def test_the_csv_says_which_answers_are_unsure():
    out = io.StringIO()
    write_csv([Prediction("a.png", [("cat", 0.3)], unsure=True), Prediction("b.png", [("dog", 0.9)]),
               Prediction("c.png", [], "not an image")], out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["unsure"] for r in rows] == ["yes", "no", ""]
