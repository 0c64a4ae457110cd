"""What an inpainting training set holds: lesion images (optionally of some categories only) and
healthy images joining them under their own caption, with no lesion.

With only lesion images, the conditional and the unconditional (dropped-prompt) branches learn the
same thing and classifier-free guidance has nothing to amplify. Healthy images captioned with a
different prompt (by default the empty one) make "with a lesion" mean something: the random masks
put on them (see `data/loading/masks.py`) must be filled with plain tissue, the lesion images' masks with a
lesion, and guidance pushes a painted region toward the lesion side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from mame_lightning.data.loading.prepared_set import PreparedImageDataset, tokenize_prompts

# Batch keys that only lesion items could carry (their masks are the lesion boxes); a mixed batch
# drops them, so the module encodes every masked image from its pixels and the mask it draws.
LESION_ONLY_KEYS = ("masked_pixel_values", "masked_latent_mean", "masked_latent_logvar")


def healthy_count(share: float, lesion_images: int, available: int) -> int:
    """How many healthy images make `share` of the mixed training set."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"healthy.share must be in [0, 1), got {share}")
    return min(available, round(share / (1.0 - share) * lesion_images))


def pick_healthy(ids: list[str], count: int, seed: int) -> list[str]:
    """A seeded, order-independent choice of `count` healthy ids (ranked by a hash, like the val split)."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"healthy:{seed}:{i}".encode()).hexdigest())
    chosen = set(ranked[:count])
    return [i for i in ids if i in chosen]


def recaption(images: PreparedImageDataset, prompt: str, tokenizer) -> PreparedImageDataset:
    """The same images under one caption (records keep their own attributes)."""
    part = images.subset(images.ids)
    part.records = [{**record, "prompt": prompt} for record in part.records]
    part.input_ids = tokenize_prompts(tokenizer, [prompt] * len(part.records))
    return part


class InpaintMix(Dataset):
    """Lesion items followed by healthy items with an all-zero lesion mask, in one index space."""

    def __init__(self, lesions: Dataset, healthy: Dataset, mask_size: tuple[int, int]):
        self.lesions, self.healthy = lesions, healthy
        self.mask_size = tuple(int(s) for s in mask_size)

    @property
    def records(self) -> list[dict]:
        """The lesion images' records: what the exported model says it was trained to paint."""
        return self.lesions.records

    @property
    def ids(self) -> list[str]:
        return list(self.lesions.ids) + list(self.healthy.ids)

    def __len__(self) -> int:
        return len(self.lesions) + len(self.healthy)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < len(self.lesions):
            item = dict(self.lesions[index])
        else:
            item = dict(self.healthy[index - len(self.lesions)])
            item["mask"] = torch.zeros(1, *self.mask_size)
        for key in LESION_ONLY_KEYS:
            item.pop(key, None)
        return item


def category_parts(name: str | None) -> set[str]:
    """'Mass, Suspicious Calcification' -> {'mass', 'suspicious calcification'} (case does not count)."""
    return {" ".join(part.split()).casefold() for part in str(name or "").split(",") if part.strip()}


def lesion_ids(records: list[dict], categories) -> list[str]:
    """Ids of the lesion images with at least one box of one of `categories`.

    Lesions the images cannot show (the 64 px phantoms' sub-pixel calcifications) would teach a
    model that a lesion box holds nothing visible as often as not.
    """
    wanted = set().union(*(category_parts(c) for c in categories))
    return [r["id"] for r in records
            if any(category_parts(box[4] if len(box) > 4 else "lesion") & wanted for box in r.get("boxes") or [])]


def healthy_options(healthy: Mapping | None) -> dict | None:
    """None (off) or {"prompt", "share"}; unknown keys are an error naming them."""
    if not healthy:
        return None
    options = {"prompt": "", "share": 0.5} | dict(healthy)
    unknown = set(options) - {"prompt", "share", "enabled"}
    if unknown:
        raise ValueError(f"unknown healthy key(s) {sorted(unknown)}; known: enabled, prompt, share")
    if not options.pop("enabled", True):
        return None
    return options


__all__ = ["InpaintMix", "healthy_count", "pick_healthy", "recaption", "healthy_options", "category_parts",
           "lesion_ids", "LESION_ONLY_KEYS"]
