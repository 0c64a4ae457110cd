"""Samples as tensors: every image of a split decoded once into memory, at one size.

Phantom and prepared sets at classifier sizes are small (1,000 images of 64x64 are 4 MB), so the
arms and seeds share decoded tensors instead of re-reading PNGs per step. Boxes follow the resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mame_lightning.data.loading.prepared_set import load_gray
from mame_lightning.data.loading.sampling import ResumableStreamSampler
from mame_lightning.utility.split import Sample


@dataclass(eq=False)
class ImageSet(Dataset):
    """images: N×1×S×S float32 in [0, 1]; labels: N float32 (1 = lesion); boxes scaled to S."""

    images: torch.Tensor
    labels: torch.Tensor
    samples: list[Sample]
    boxes: list[tuple[tuple[float, float, float, float], ...]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def subset(self, indices) -> "ImageSet":
        indices = list(indices)
        return ImageSet(self.images[indices], self.labels[indices], [self.samples[i] for i in indices],
                        [self.boxes[i] for i in indices])

    @property
    def lesion_indices(self) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s.label == 1]


def load_image_set(samples: list[Sample], size: int) -> ImageSet:
    """Decode, resize to size×size (bilinear) and scale the boxes the same way."""
    images, boxes = [], []
    for sample in samples:
        gray = load_gray(sample.path, None, Image.Resampling.BILINEAR)
        height, width = gray.shape
        if (height, width) != (size, size):
            gray = np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR))
        sx, sy = size / width, size / height
        boxes.append(tuple((x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in sample.boxes))
        images.append(torch.from_numpy(gray.copy()))
    stacked = torch.stack(images).unsqueeze(1).float().div(255.0) if images else torch.zeros(0, 1, size, size)
    labels = torch.tensor([float(s.label) for s in samples])
    return ImageSet(stacked, labels, list(samples), boxes)


def concat(*sets: ImageSet) -> ImageSet:
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                    [x for s in sets for x in s.samples], [b for s in sets for b in s.boxes])


def train_loader(data: ImageSet, batch_size: int, seed: int) -> DataLoader:
    """An endless seeded stream of batches: every arm trains for the same number of steps whatever
    its size, and a seed gives the same batches."""
    sampler = ResumableStreamSampler(len(data), batch_size, seed=seed)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)


def eval_loader(data: ImageSet, batch_size: int) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False)
