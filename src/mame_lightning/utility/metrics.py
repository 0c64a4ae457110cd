"""Test-split metrics of the lesion classifier (torchmetrics), and the bootstrap around them.

The bootstrap resamples lesion and healthy test images separately (stratified), so every resample
holds both classes and the AUROC is always defined; with several seeds each resample scores the
mean AUROC over the seeds on the same resampled cases, which gives a CI for the arm, not a seed.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc, binary_sensitivity_at_specificity


def _targets(labels) -> torch.Tensor:
    return torch.as_tensor(labels).long()


def auroc(probs, labels) -> float:
    return float(binary_auroc(torch.as_tensor(probs).float(), _targets(labels)))


def roc_curve(probs, labels) -> dict[str, list[float]]:
    fpr, tpr, _ = binary_roc(torch.as_tensor(probs).float(), _targets(labels))
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def sensitivity_at_specificity(probs, labels, specificity: float = 0.9) -> tuple[float, float]:
    """The highest sensitivity whose specificity is at least `specificity`, and its threshold."""
    sensitivity, threshold = binary_sensitivity_at_specificity(
        torch.as_tensor(probs).float(), _targets(labels), min_specificity=float(specificity))
    return float(sensitivity), float(threshold)


def bootstrap_auroc_ci(prob_rows, labels, n_resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the mean AUROC over the rows of `prob_rows` (seeds × cases)."""
    rows = torch.stack([torch.as_tensor(row).float().reshape(-1) for row in prob_rows])
    targets = _targets(labels)
    positives, negatives = torch.nonzero(targets == 1)[:, 0], torch.nonzero(targets == 0)[:, 0]
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("AUROC needs lesion and healthy test images")
    generator = torch.Generator().manual_seed(int(seed))
    values = torch.empty(int(n_resamples))
    for b in range(int(n_resamples)):
        index = torch.cat([positives[torch.randint(len(positives), (len(positives),), generator=generator)],
                           negatives[torch.randint(len(negatives), (len(negatives),), generator=generator)]])
        values[b] = torch.stack([binary_auroc(row[index], targets[index], validate_args=False) for row in rows]).mean()
    tail = (1.0 - float(level)) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1.0 - tail]))
    return float(low), float(high)
