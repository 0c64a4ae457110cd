"""Training masks for inpainting: the lesion boxes of the prepared set mixed with random boxes and
brush strokes, the way Stable Diffusion's inpainting model was trained.

A model that only ever sees lesion boxes learns little about keeping what lies outside its mask;
random shapes and sizes teach it to copy the masked-image latents everywhere else. Every draw
comes from the caller's `torch.Generator`, so a training step (and a resumed run) draws the same
masks. Masks are float {0, 1}, B×1×H×W, 1 = region to paint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("lesion", "box", "stroke")


@dataclass(frozen=True)
class MaskMix:
    """Share of each mask kind per sample, and the size of the random shapes (fractions of the side).

    keep_lesion: a random mask also covers the image's lesion boxes, so whatever is masked on a
    lesion image still holds a lesion, as its prompt says.
    lesion_size: an image without lesion boxes (a healthy one) drawn as "lesion" gets a random box
    of this side instead, so lesion-sized masks are also seen filled with plain tissue.
    """

    lesion: float = 1.0
    box: float = 0.0
    stroke: float = 0.0
    box_size: tuple[float, float] = (0.1, 0.5)
    stroke_width: tuple[float, float] = (0.05, 0.15)
    stroke_vertices: tuple[int, int] = (2, 5)
    keep_lesion: bool = True
    lesion_size: tuple[float, float] = (0.08, 0.2)

    def __post_init__(self):
        shares = (self.lesion, self.box, self.stroke)
        if min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"mask shares must be >= 0 and not all zero, got lesion={self.lesion}, "
                             f"box={self.box}, stroke={self.stroke}")
        for name in ("box_size", "stroke_width", "lesion_size"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"masks.{name} must be 0 < low <= high <= 1 (fractions of the side), got {low}, {high}")
        low, high = self.stroke_vertices
        if not 2 <= low <= high:
            raise ValueError(f"masks.stroke_vertices must be 2 <= low <= high, got {low}, {high}")

    @classmethod
    def from_config(cls, config: Mapping | None) -> "MaskMix":
        """From a plain mapping (Hydra hands DictConfig; lists become tuples)."""
        values = dict(config or {})
        for key in ("box_size", "stroke_width", "stroke_vertices", "lesion_size"):
            if key in values:
                values[key] = tuple(values[key])
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown masks key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)

    @property
    def random_share(self) -> float:
        return (self.box + self.stroke) / (self.lesion + self.box + self.stroke)


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) draws on the generator's device (a CUDA generator draws on the GPU)."""
    return torch.rand(n, generator=generator, device=_device(generator))


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * _rand(n, generator)


def random_boxes(n: int, size: tuple[int, int], generator: torch.Generator | None = None,
                 side: tuple[float, float] = (0.1, 0.5)) -> Tensor:
    """n rectangles, each side a uniform share `side` of the image side, placed uniformly inside."""
    height, width = size
    h = (_uniform(n, *side, generator) * height).round().clamp(min=1)
    w = (_uniform(n, *side, generator) * width).round().clamp(min=1)
    y0 = (_rand(n, generator) * (height - h + 1)).floor()
    x0 = (_rand(n, generator) * (width - w + 1)).floor()
    ys = torch.arange(height, dtype=torch.float32, device=_device(generator)).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32, device=_device(generator)).view(1, 1, width)
    inside = ((ys >= y0.view(-1, 1, 1)) & (ys < (y0 + h).view(-1, 1, 1))
              & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + w).view(-1, 1, 1)))
    return inside.float().unsqueeze(1)


def random_strokes(n: int, size: tuple[int, int], generator: torch.Generator | None = None,
                   width: tuple[float, float] = (0.05, 0.15), vertices: tuple[int, int] = (2, 5)) -> Tensor:
    """n brush strokes: a random polyline (`vertices` points, steps of a quarter side in random
    directions) swept by a disc of random width; the free-form masks of LaMa / SD inpainting."""
    height, width_px = size
    side = float(min(height, width_px))
    device = _device(generator)
    ys = torch.arange(height, dtype=torch.float32, device=device).view(1, height, 1) + 0.5
    xs = torch.arange(width_px, dtype=torch.float32, device=device).view(1, 1, width_px) + 0.5
    count = int(torch.randint(vertices[0], vertices[1] + 1, (1,), generator=generator, device=device))
    radius = _uniform(n, *width, generator) * side / 2
    point = torch.stack([_rand(n, generator) * height,
                         _rand(n, generator) * width_px], dim=1)
    masks = torch.zeros(n, height, width_px, dtype=torch.bool, device=device)
    for _ in range(count - 1):
        angle = _rand(n, generator) * 2 * math.pi
        length = _uniform(n, 0.15, 0.4, generator) * side
        step = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1) * length[:, None]
        end = torch.stack([(point[:, 0] + step[:, 0]).clamp(0, height - 1),
                           (point[:, 1] + step[:, 1]).clamp(0, width_px - 1)], dim=1)
        masks |= _near_segment(ys, xs, point, end, radius)
        point = end
    return masks.float().unsqueeze(1)


def _near_segment(ys: Tensor, xs: Tensor, start: Tensor, end: Tensor, radius: Tensor) -> Tensor:
    """Pixels within `radius` of the segment start→end (per sample)."""
    sy, sx = start[:, 0].view(-1, 1, 1), start[:, 1].view(-1, 1, 1)
    dy, dx = (end[:, 0] - start[:, 0]).view(-1, 1, 1), (end[:, 1] - start[:, 1]).view(-1, 1, 1)
    length2 = (dy**2 + dx**2).clamp(min=1e-6)
    t = (((ys - sy) * dy + (xs - sx) * dx) / length2).clamp(0, 1)
    distance2 = (ys - (sy + t * dy)) ** 2 + (xs - (sx + t * dx)) ** 2
    return distance2 <= radius.view(-1, 1, 1) ** 2


def mix_masks(lesion_masks: Tensor, mix: MaskMix, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace each sample's lesion mask by a random box or stroke with the mix's shares.

    Returns (masks B×1×H×W, kinds: LongTensor of indices into KINDS). Draws happen in a fixed
    order whatever the mix, so changing one share does not reshuffle the others' shapes.
    """
    n = lesion_masks.shape[0]
    size = tuple(int(s) for s in lesion_masks.shape[-2:])
    total = mix.lesion + mix.box + mix.stroke
    u = _rand(n, generator)
    kinds = torch.where(u < mix.lesion / total, 0, torch.where(u < (mix.lesion + mix.box) / total, 1, 2))
    boxes = random_boxes(n, size, generator, mix.box_size)
    strokes = random_strokes(n, size, generator, mix.stroke_width, mix.stroke_vertices)
    small = random_boxes(n, size, generator, mix.lesion_size)
    lesion = (lesion_masks.detach().to(_device(generator), torch.float32) > 0.5).float()
    empty = lesion.flatten(1).amax(1) == 0
    lesion = torch.where(empty.view(-1, 1, 1, 1), small, lesion)  # no lesion: a lesion-sized box of tissue
    chosen = torch.where((kinds == 1).view(-1, 1, 1, 1), boxes, strokes)
    if mix.keep_lesion:
        chosen = torch.where(empty.view(-1, 1, 1, 1), chosen, torch.maximum(chosen, lesion))
    masks = torch.where((kinds == 0).view(-1, 1, 1, 1), lesion, chosen)
    return masks.to(lesion_masks.device), kinds


__all__ = ["KINDS", "MaskMix", "random_boxes", "random_strokes", "mix_masks"]
