"""Training batches for DreamBooth prior preservation: each training image paired with a class image.

As diffusers' train_dreambooth.py does it: item i is the training ("instance") image i and class
image i mod the number of class images; a batch of B such pairs becomes one batch of 2B rows, the B
training rows first, and `is_prior` (a bool per row) tells the loss which rows are class images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, default_collate


class PriorMix(Dataset):
    """Training images (their own index space, length and records) with a class image each."""

    def __init__(self, instances: Dataset, classes: Dataset):
        if len(classes) == 0:
            raise ValueError("prior preservation needs at least one class image")
        self.instances, self.classes = instances, classes

    @property
    def records(self) -> list[dict]:
        """The training images' records: what the exported model says it was trained on."""
        return self.instances.records

    @property
    def ids(self) -> list[str]:
        return list(self.instances.ids)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.instances[index], self.classes[index % len(self.classes)]

    @staticmethod
    def collate(pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
        """B (instance, class) pairs -> one batch: B instance rows, then B class rows, and `is_prior`."""
        instances, classes = [list(side) for side in zip(*pairs)]
        keys = set(instances[0]) & set(classes[0])  # the keys both kinds carry (pixels or cached latents)
        rows = [{key: item[key] for key in keys} for item in instances + classes]
        batch = default_collate(rows)
        batch["is_prior"] = torch.tensor([False] * len(instances) + [True] * len(classes))
        return batch


__all__ = ["PriorMix"]
