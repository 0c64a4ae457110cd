"""FID/KID: the offline skip path (no weights, no download) and the arithmetic with a tiny backbone."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from mame_lightning.eval import fid as fid_module
from mame_lightning.eval.fid import fid_kid, to_uint8_rgb


class PooledPixels(nn.Module):
    """Stand-in backbone: 3x3 average-pooled intensities of each channel (27 features)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 3).flatten(1)


def _images(seed: int, n: int = 24, size: int = 32, offset: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, size, size)) + offset, 0, 255).astype(np.uint8)


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_no_weights_skips_with_the_message(caplog, no_download):
    with caplog.at_level(logging.WARNING, logger="mame_lightning.eval.fid"):
        assert fid_kid(_images(0), _images(1), weights_path=None) is None
    assert "FID/KID skipped: no local Inception weights" in caplog.text
    assert "eval.fid.weights=/path/to/pt_inception-2015-12-05.pth" in caplog.text


def test_missing_weights_file_skips_and_names_it(tmp_path, caplog, no_download):
    missing = tmp_path / "pt_inception-2015-12-05.pth"
    with caplog.at_level(logging.WARNING, logger="mame_lightning.eval.fid"):
        assert fid_kid(_images(0), _images(1), weights_path=str(missing)) is None
    assert str(missing) in caplog.text


def test_weights_without_torch_fidelity_skip(tmp_path, caplog, monkeypatch, no_download):
    weights = tmp_path / "pt_inception-2015-12-05.pth"
    weights.write_bytes(b"not really weights")
    monkeypatch.setattr(fid_module, "fidelity_installed", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mame_lightning.eval.fid"):
        assert fid_kid(_images(0), _images(1), weights_path=str(weights)) is None
    assert "torch-fidelity" in caplog.text


def test_identical_sets_give_zero_and_different_sets_do_not():
    real = _images(0)
    same = fid_kid(real, real.copy(), feature=PooledPixels(), kid_subset_size=12, kid_subsets=20)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert abs(same["kid_mean"]) < 1e-3
    brighter = fid_kid(real, _images(0, offset=40), feature=PooledPixels(), kid_subset_size=12, kid_subsets=20)
    # same images brighter by 40 (no clipping): covariances equal, FID = squared mean shift, 27 features
    assert brighter["fid"] == pytest.approx(27 * (40 / 255) ** 2, rel=1e-4)
    assert brighter["kid_mean"] > same["kid_mean"] + 1e-3
    assert brighter["n_real"] == 24 and brighter["n_fake"] == 24 and brighter["feature"] == "PooledPixels"


def test_kid_subset_is_capped_and_seeded():
    first = fid_kid(_images(0, n=6), _images(2, n=8), feature=PooledPixels(), kid_subset_size=50, kid_subsets=5)
    again = fid_kid(_images(0, n=6), _images(2, n=8), feature=PooledPixels(), kid_subset_size=50, kid_subsets=5)
    assert first["kid_subset_size"] == 6
    assert first == again


def test_input_layouts_agree():
    grey = _images(3, n=4)
    as_nhwc = grey[..., None]
    as_tensor = torch.from_numpy(grey).float().div(255).unsqueeze(1)
    for layout in (grey, as_nhwc, as_tensor, list(grey)):
        converted = to_uint8_rgb(layout)
        assert converted.shape == (4, 3, 32, 32) and converted.dtype == torch.uint8
        assert torch.equal(converted[:, 0], torch.from_numpy(grey))
        assert torch.equal(converted[:, 0], converted[:, 2])


def test_too_few_images_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(_images(0, n=1), _images(1), feature=PooledPixels())
