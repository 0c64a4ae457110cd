"""Pairwise MS-SSIM diversity, its small-image settings, and the guidance sweep table/CSV."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mame_lightning.eval.msssim import (DEFAULT_BETAS, guidance_sweep_table, msssim_settings, pairwise_ms_ssim,
                                        read_guidance_sweep_csv, write_guidance_sweep_csv)
from mame_lightning.eval.plots import plot_guidance_sweep


def _structured(seed: int, size: int = 64) -> np.ndarray:
    """A smooth image with a few discs: structure that MS-SSIM can match or miss."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    img = 0.3 + 0.3 * np.sin(2 * np.pi * (xs * rng.uniform(0.5, 2) + ys * rng.uniform(0.5, 2)))
    for _ in range(4):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
        img[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = rng.uniform(0.6, 1.0)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def test_identical_images_score_one_with_zero_spread():
    image = torch.from_numpy(_structured(0)).float().div(255)[None, None]
    mean, std, values = pairwise_ms_ssim(image.repeat(5, 1, 1, 1), progress=False)
    assert values.shape == (10,)
    assert mean == pytest.approx(1.0, abs=1e-5)
    assert std == pytest.approx(0.0, abs=1e-6)


def test_image_against_noise_scores_low():
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    result = pairwise_ms_ssim([_structured(0), noise], progress=False)
    assert result.mean < 0.2
    assert result.std == 0.0  # one pair


def test_varied_set_is_more_diverse_than_a_set_of_near_copies():
    base = _structured(3).astype(int)
    rng = np.random.default_rng(0)
    near_copies = [np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8) for _ in range(4)]
    varied = [_structured(seed) for seed in range(4)]
    assert pairwise_ms_ssim(near_copies, progress=False).mean > pairwise_ms_ssim(varied, progress=False).mean + 0.2


def test_uint8_list_matches_float_tensor_and_batching_does_not_change_values():
    images = [_structured(seed) for seed in range(5)]
    from_list = pairwise_ms_ssim(images, batch_size=3, progress=False)
    tensor = torch.from_numpy(np.stack(images)).float().div(255).unsqueeze(1)
    from_tensor = pairwise_ms_ssim(tensor, batch_size=100, progress=False)
    np.testing.assert_allclose(from_list.values, from_tensor.values, atol=1e-6)
    # pairs come in (0,1), (0,2), ... order: pair (0,1) alone must give the first value
    first_pair = pairwise_ms_ssim(images[:2], progress=False)
    assert first_pair.values[0] == pytest.approx(from_list.values[0], abs=1e-6)


def test_rgb_images_are_accepted():
    grey = _structured(4)
    rgb = [np.stack([grey] * 3, axis=-1), np.stack([_structured(5)] * 3, axis=-1)]
    assert pairwise_ms_ssim(rgb, progress=False).mean == pytest.approx(
        pairwise_ms_ssim([grey, _structured(5)], progress=False).mean, abs=1e-5)


def test_settings_shrink_for_small_images_and_are_reported():
    full = msssim_settings(512, 512)
    assert full["scales"] == 5 and full["kernel_size"] == 11 and not full["reduced"]
    assert full["betas"] == DEFAULT_BETAS
    small = msssim_settings(64, 64)
    assert small["reduced"] and small["scales"] < 5 and small["kernel_size"] == 11
    assert sum(small["betas"]) == pytest.approx(1.0)
    tiny = msssim_settings(12, 12)
    assert tiny["scales"] >= 1 and tiny["kernel_size"] <= 11
    assert msssim_settings(8, 8)["kernel_size"] < 11  # the window itself had to shrink
    with pytest.raises(ValueError, match="too small"):
        msssim_settings(2, 2)
    result = pairwise_ms_ssim([_structured(0), _structured(1)], progress=False)
    assert result.settings["scales"] == small["scales"] and result.settings["image_size"] == [64, 64]
    assert math.isfinite(pairwise_ms_ssim([_structured(0, 32), _structured(1, 32)], progress=False).mean)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_ms_ssim([_structured(0)], progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pairwise_ms_ssim(torch.full((2, 1, 32, 32), 3.0), progress=False)
    with pytest.raises(ValueError, match="image 1 has shape"):
        pairwise_ms_ssim([_structured(0), _structured(1, 32)], progress=False)


def _sweep_rows():
    rows = []
    for model in ("mam-e", "tiny"):
        for prompt in ("a CC view", "an MLO view"):
            for guidance in (14.0, 4.0, 7.5):
                rows.append({"model": model, "prompt": prompt, "guidance": guidance,
                             "ms_ssim_mean": 0.3 + guidance / 100, "ms_ssim_std": 0.0512,
                             "seconds_per_image": 1.5, "n": 20})
    return rows


def test_guidance_table_has_one_column_per_scale_and_one_row_per_model_prompt():
    rows = _sweep_rows()
    rows = [r for r in rows if not (r["model"] == "tiny" and r["prompt"] == "an MLO view" and r["guidance"] == 7.5)]
    lines = guidance_sweep_table(rows).strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["model", "prompt", "w=4", "w=7.5", "w=14", "s/image"]
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert len(body) == 4
    assert body[0][:2] == ["mam-e", "a CC view"]
    assert body[0][2] == "0.340 ± 0.051" and body[0][4] == "0.440 ± 0.051"
    assert body[3][3] == "–"  # the missing (tiny, MLO, 7.5) cell
    assert body[0][5] == "1.50"


def test_guidance_table_without_timings_has_no_time_column():
    rows = [{"model": "m", "prompt": "p", "guidance": 4, "ms_ssim_mean": 0.5, "ms_ssim_std": 0.1, "n": 3}]
    header = guidance_sweep_table(rows).splitlines()[0]
    assert "s/image" not in header and "w=4" in header


def test_sweep_csv_round_trip(tmp_path):
    rows = _sweep_rows()
    rows[0]["seconds_per_image"] = None
    path = write_guidance_sweep_csv(tmp_path / "sweep.csv", rows)
    back = read_guidance_sweep_csv(path)
    assert len(back) == len(rows)
    for original, parsed in zip(rows, back):
        assert parsed["model"] == original["model"] and parsed["prompt"] == original["prompt"]
        assert parsed["guidance"] == original["guidance"] and parsed["n"] == original["n"]
        assert parsed["ms_ssim_mean"] == pytest.approx(original["ms_ssim_mean"])
        assert parsed["seconds_per_image"] == original["seconds_per_image"]
    assert guidance_sweep_table(back) == guidance_sweep_table(rows)
    assert os.listdir(tmp_path) == ["sweep.csv"]  # no temporary file left behind


def test_guidance_plot_is_a_readable_png(tmp_path):
    path = plot_guidance_sweep(_sweep_rows(), tmp_path / "sweep.png")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] > 100 and pixels.std() > 0
