"""FID and KID between real and generated images, with local Inception weights only.

torchmetrics computes both; its default Inception backbone comes from torch-fidelity and would be
downloaded when no weights file is given. This module never lets that happen: without a readable
local weights file (or without torch-fidelity) it logs why and returns None, so an evaluation run
on an offline machine still finishes with its other metrics. Features are extracted once per image
set and handed to both metrics, so the backbone runs only once per image.

A custom feature extractor (any module mapping uint8 Nx3xHxW to NxD) can replace Inception, for
domain-specific backbones or tests; its distances are then not comparable with published FIDs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from mame_lightning.eval.msssim import as_image_batch

log = logging.getLogger(__name__)

WEIGHTS_FILE_NAME = "pt_inception-2015-12-05.pth"
NO_WEIGHTS_MESSAGE = ("FID/KID skipped: no local Inception weights; "
                      f"pass eval.fid.weights=/path/to/{WEIGHTS_FILE_NAME}")
NO_FIDELITY_MESSAGE = ("FID/KID skipped: torch-fidelity is not installed (it provides the Inception "
                       "network torchmetrics uses); pip install torch-fidelity")


class _Precomputed(nn.Module):
    """Identity 'backbone' so the metrics accept features that were already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fidelity_installed() -> bool:
    """Whether torch-fidelity (the Inception network behind torchmetrics' FID) can be imported."""
    return importlib.util.find_spec("torch_fidelity") is not None


def skip_reason(weights_path: str | os.PathLike | None) -> str | None:
    """Why the Inception FID/KID cannot run here (None when it can). Checks the file first, so
    no code path reaches torch-fidelity's download."""
    if weights_path is None or not str(weights_path).strip():
        return NO_WEIGHTS_MESSAGE
    if not os.path.isfile(weights_path):
        return f"{NO_WEIGHTS_MESSAGE} (not a file: {weights_path})"
    if not fidelity_installed():
        return NO_FIDELITY_MESSAGE
    return None


def inception_features(weights_path: str | os.PathLike) -> nn.Module:
    """torchmetrics' FID Inception v3 (2048-d pool features) loaded from a local weights file."""
    if not os.path.isfile(weights_path):  # never let torch-fidelity fall back to its download
        raise FileNotFoundError(f"{weights_path}: Inception weights file not found")
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=os.fspath(weights_path))


def to_uint8_rgb(images: Any) -> torch.Tensor:
    """uint8 Nx3xHxW from uint8 arrays NxHxW / NxHxWx{1,3} (or lists of them) or tensors NxCxHxW
    (uint8, or float in [0, 1]); grey images are repeated over 3 channels."""
    if not isinstance(images, torch.Tensor):
        array = np.stack([np.asarray(i) for i in images]) if isinstance(images, (list, tuple)) else np.asarray(images)
        if array.ndim == 4 and array.shape[-1] in (1, 3, 4):
            array = array[..., :3].transpose(0, 3, 1, 2)
        images = torch.from_numpy(np.ascontiguousarray(array))
    if images.dtype != torch.uint8:
        images = (as_image_batch(images) * 255.0).round().to(torch.uint8)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected N x {{1,3}} x H x W images, got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def extract_features(images: torch.Tensor, feature: nn.Module, batch_size: int = 32,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Run `feature` over uint8 images in batches; float64 NxD on the CPU."""
    feature = feature.to(device).eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            out = feature(images[start:start + batch_size].to(device))
            chunks.append(out.reshape(out.shape[0], -1).double().cpu())
    return torch.cat(chunks)


def fid_kid(real: Any, fake: Any, weights_path: str | os.PathLike | None = None,
            kid_subset_size: int = 50, kid_subsets: int = 100, feature: nn.Module | None = None,
            batch_size: int = 32, device: str | torch.device = "cpu", seed: int = 0) -> dict | None:
    """FID and KID (mean, std over `kid_subsets` subsets) of `fake` against `real`.

    With `feature` None the Inception backbone is built from `weights_path`; a missing file or a
    missing torch-fidelity logs the reason and returns None. The KID subset size is capped at the
    smaller set size; `seed` fixes the KID subsets. Both sets need at least 2 images.
    """
    if feature is None:
        reason = skip_reason(weights_path)
        if reason is not None:
            log.warning(reason)
            return None
        feature, feature_name = inception_features(weights_path), "inception-v3-compat-2048"
    else:
        feature_name = type(feature).__name__
    real_u8, fake_u8 = to_uint8_rgb(real), to_uint8_rgb(fake)
    if real_u8.shape[0] < 2 or fake_u8.shape[0] < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {real_u8.shape[0]} real "
                         f"and {fake_u8.shape[0]} generated")
    real_feats = extract_features(real_u8, feature, batch_size, device)
    fake_feats = extract_features(fake_u8, feature, batch_size, device)

    subset = int(min(kid_subset_size, real_feats.shape[0], fake_feats.shape[0]))
    fid = FrechetInceptionDistance(feature=_Precomputed(real_feats.shape[1]))
    with warnings.catch_warnings():  # the feature-buffer notice does not apply to a few thousand images
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(real_feats.shape[1]), subsets=kid_subsets,
                                      subset_size=subset)
    for metric in (fid, kid):
        metric.update(real_feats, real=True)
        metric.update(fake_feats, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": subset, "kid_subsets": int(kid_subsets),
            "n_real": int(real_feats.shape[0]), "n_fake": int(fake_feats.shape[0]), "feature": feature_name}
