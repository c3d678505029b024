"""Calibrated confidence and "none of these classes": temperature scaling and an unsure
threshold, both chosen on validation data at the end of training and stored with the model.

Temperature scaling (Guo et al., 2017) divides the scores by one number T fitted to minimise
the validation loss: the predicted class never changes, its probability gets honest. The
unsure rule flags an image whose top (calibrated) probability is below the value that
`KEEP` of the validation images reach: the maximum-softmax-probability baseline for
out-of-distribution detection (Hendrycks & Gimpel, 2017).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the fitting needs PyTorch; reading a model's calibration does not
    import torch

BINS = 15
KEEP = 0.95  # share of in-domain (validation) images the unsure threshold lets through
RULE = "max_softmax_probability"


@dataclass(frozen=True)
class Calibration:
    """What a logged model's metadata says about its confidence."""

    temperature: float = 1.0
    unsure_below: float | None = None  # top probability under which an answer is flagged
    source: str = "none"  # where the values were chosen, e.g. "validation (5000 images)"

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "unsure_rule": RULE if self.unsure_below else "none",
                "unsure_below": self.unsure_below, "unsure_keep": KEEP, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict | None) -> Calibration:
        """A model's calibration metadata; a model logged before calibration existed has none."""
        if not d:
            return cls()
        temperature = float(d.get("temperature", 1.0))
        below = d.get("unsure_below")
        below = None if below is None else float(below)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature {temperature} is not a positive number")
        if below is not None and not 0 < below <= 1:
            raise ValueError(f"unsure_below {below} is not a probability in (0, 1]")
        return cls(temperature, below, str(d.get("source", "")))

    def unsure(self, top_probability: float) -> bool:
        return self.unsure_below is not None and top_probability < self.unsure_below


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the cross-entropy of logits / T (LBFGS on log T)."""
    import torch
    import torch.nn.functional as F

    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def unsure_threshold(probs: torch.Tensor, keep: float = KEEP) -> float:
    """The top probability that a share `keep` of these (in-domain) images reach."""
    import torch

    return float(torch.quantile(probs.max(1).values.double(), 1.0 - keep))


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> list[dict]:
    """Per confidence bin: its range, image count, mean confidence and accuracy."""
    import torch

    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence.double(), edges[1:-1], right=True)
    rows = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                     "confidence": float(confidence[inside].double().mean()) if n else float("nan"),
                     "accuracy": float(correct[inside].mean()) if n else float("nan")})
    return rows


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their counts."""
    total = len(labels)
    return sum(r["count"] / total * abs(r["accuracy"] - r["confidence"])
               for r in reliability(probs, labels, bins) if r["count"])


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> tuple[Calibration, dict[str, float]]:
    """Temperature and unsure threshold from validation scores, with the figures to log."""
    temperature = fit_temperature(logits, labels)
    before = logits.double().softmax(1)
    after = (logits.double() / temperature).softmax(1)
    calibration = Calibration(temperature, unsure_threshold(after),
                              f"validation ({len(labels)} images)")
    return calibration, {"temperature": temperature,
                         "val_ece_before_temperature": expected_calibration_error(before, labels),
                         "val_ece": expected_calibration_error(after, labels),
                         "unsure_below": calibration.unsure_below}
