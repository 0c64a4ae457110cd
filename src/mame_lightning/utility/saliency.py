"""Where does the classifier look? Saliency maps from `monai.visualize` and the localisation score.

A test lesion counts as localised when the maximum of its saliency map falls on a pixel its
annotated box covers (`data.geometry.box_mask`, the mask preparation writes). Grad-CAM is the
default (one backward pass per batch); occlusion sensitivity (saliency = drop of the lesion
probability when a patch is hidden) needs no layer name but one forward pass per patch position.
The chance level is what a peak dropped uniformly on the breast would score: box area / tissue area.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.visualize import GradCAM, OcclusionSensitivity

from mame_lightning.data.geometry import box_mask
from mame_lightning.data.records import Box
from mame_lightning.data.tissue import tissue_mask

METHODS = ("gradcam", "occlusion")


def scale_each(maps: torch.Tensor) -> torch.Tensor:
    """Each B×C×H×W map to [0, 1] with its maximum at 1 (MONAI's default post-processing maps the
    maximum to 0, which would turn "peak" into "least important")."""
    flat = maps.reshape(maps.shape[0], -1)
    low, high = flat.min(1).values, flat.max(1).values
    scale = torch.where(high > low, high - low, torch.ones_like(high))
    return (maps - low.view(-1, 1, 1, 1)) / scale.view(-1, 1, 1, 1)


def saliency_maps(module, images: torch.Tensor, method: str = "gradcam", target_layer: str | None = None,
                  batch_size: int = 32, mask_size: int = 8, overlap: float = 0.6) -> np.ndarray:
    """N×H×W saliency (higher = more important for the lesion logit) for N×1×H×W images."""
    if method not in METHODS:
        raise ValueError(f"saliency.method={method!r}: choose from {', '.join(METHODS)}")
    module = module.cpu().eval()
    if len(images) == 0:
        return np.zeros((0, *images.shape[2:]), np.float32)
    if method == "gradcam":
        cam = GradCAM(nn_module=module.network, target_layers=target_layer, postprocessing=scale_each)
        maps = [cam(images[i:i + batch_size], class_idx=0)[:, 0] for i in range(0, len(images), batch_size)]
        return torch.cat(maps).detach().float().numpy()
    occlusion = OcclusionSensitivity(nn_module=module.network, mask_size=mask_size, n_batch=batch_size,
                                     overlap=overlap, verbose=False)
    maps = []
    with torch.no_grad():
        for i in range(len(images)):
            probability = occlusion(images[i:i + 1])[0][0, 0]  # H×W (H×W×classes in some versions)
            maps.append(-(probability[..., 0] if probability.ndim == images.ndim - 1 else probability))
    return torch.stack(maps).float().numpy()


def peak(saliency: np.ndarray) -> tuple[int, int]:
    """(row, col) of the map's maximum (the first one on ties)."""
    row, col = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    return int(row), int(col)


def peak_in_boxes(saliency: np.ndarray, boxes) -> bool:
    """True when the maximum lies on a pixel one of the boxes covers; a flat map localises nothing."""
    if not boxes or float(np.ptp(saliency)) == 0.0:
        return False
    row, col = peak(saliency)
    mask = box_mask([Box(*box) for box in boxes], saliency.shape)
    return bool(mask[row, col])


def localisation(maps: np.ndarray, boxes_per_image) -> dict:
    """Share of lesion images whose saliency maximum lies in their box, with the per-image hits."""
    hits = [peak_in_boxes(m, b) for m, b in zip(maps, boxes_per_image)]
    flat = sum(float(np.ptp(m)) == 0.0 for m in maps)
    return {"share": float(np.mean(hits)) if hits else None, "hits": hits, "n": len(hits), "flat_maps": int(flat)}


def chance_level(images: torch.Tensor, boxes_per_image) -> float | None:
    """Mean box area over breast tissue area: the score of a peak placed at random in the breast."""
    shares = []
    for image, boxes in zip(images, boxes_per_image):
        gray = (image[0].numpy() * 255).round().astype(np.uint8)
        tissue = int(tissue_mask(gray).sum())
        covered = int((box_mask([Box(*b) for b in boxes], gray.shape) > 0).sum())
        if tissue and covered:
            shares.append(min(1.0, covered / tissue))
    return float(np.mean(shares)) if shares else None
