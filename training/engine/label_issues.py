"""Which given labels are probably wrong, by confident learning (Northcutt et al., 2021) on
out-of-fold probabilities: every image is scored by a head that never saw it (k linear heads
on frozen-backbone features, each trained on the other folds), so a mislabelled image is not
scored by a model that learnt its wrong label.

An image is flagged when the class it most confidently belongs to is not its given one: the
classes whose out-of-fold probability reaches that class's threshold (the mean probability
its own labelled images get) are its candidates, and the likeliest candidate is its
suggestion. Flagged images come first, least self-confident (lowest probability of the given
label) first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LabelIssues:
    probabilities: torch.Tensor  # (N, classes) out of fold
    flagged: torch.Tensor  # (N,) bool
    suggested: torch.Tensor  # (N,) the likeliest class (the given one where not flagged)
    order: torch.Tensor  # row indices: flagged first, least self-confident first


def fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 200,
             weight_decay: float = 1e-3) -> torch.nn.Linear:
    """A linear head (softmax regression) on standardized features, full batch, L-BFGS."""
    head = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def out_of_fold(features: torch.Tensor, labels: torch.Tensor, classes: int, folds: int = 5,
                seed: int = 0) -> torch.Tensor:
    """Each row's class probabilities from a head trained on the other `folds - 1` folds."""
    x = features.float()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    fold = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)) % folds
    probabilities = torch.zeros(len(labels), classes)
    torch.manual_seed(seed)
    for k in range(folds):
        held = fold == k
        head = fit_head(x[~held], labels[~held], classes)
        with torch.no_grad():
            probabilities[held] = head(x[held]).softmax(1)
    return probabilities


def find_issues(probabilities: torch.Tensor, labels: torch.Tensor) -> LabelIssues:
    classes = probabilities.shape[1]
    thresholds = torch.stack([probabilities[labels == c, c].mean() if (labels == c).any()
                              else torch.tensor(1.0) for c in range(classes)])
    confident = probabilities >= thresholds
    candidates = torch.where(confident, probabilities, torch.full_like(probabilities, -1))
    best = candidates.argmax(1)
    flagged = confident.any(1) & (best != labels)
    suggested = torch.where(flagged, best, labels)
    self_confidence = probabilities.gather(1, labels[:, None]).squeeze(1)
    order = torch.argsort(self_confidence + (~flagged).float() * 2, stable=True)  # flagged first
    return LabelIssues(probabilities, flagged, suggested, order)
