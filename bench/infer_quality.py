"""bench_infer's "equal output" checks: SSIM of approximate images to the exact ones, and the
prompt-fidelity agreement change with a trained model (as `evaluate mode=fidelity` measures it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SSIM_BAR, FIDELITY_BAR = 0.95, 0.02
DEFAULT_FIDELITY_MODEL = Path(__file__).resolve().parent.parent / "outputs/demo/text2image/export"  # make demo


def mean_ssim(images: list[np.ndarray], references: list[np.ndarray]) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    def stack(arrays):
        return torch.from_numpy(np.stack(arrays).astype(np.float32))[:, None]

    return float(structural_similarity_index_measure(stack(images), stack(references), data_range=255.0))


def equal_output(row: dict) -> str:
    """exact (<= 1 grey level from stock), ssim X (approximate, met the bars) or not met."""
    if row["variant"] == "diffusers PNDM defaults":
        return "other sampler"
    if row["kind"] in ("baseline", "ours"):
        return "exact" if row["max_diff_vs_same_settings"] <= 1 else "not met"
    met = row["ssim"] is not None and row["ssim"] >= SSIM_BAR
    met = met and (row["fidelity_delta"] is None or abs(row["fidelity_delta"]) <= FIDELITY_BAR)
    return f"ssim {row['ssim']:.3f}" + ("" if met else " (not met)")


def fidelity_agreement(folder: Path, device: torch.device, guidance: float, batch: int, accelerate: str,
                       interval: int, prompts: int = 8, per_prompt: int = 8) -> float:
    """Mean prompt-fidelity agreement (area, view) of a trained text-to-image model's images,
    as `evaluate mode=fidelity` measures it, on a fixed seed set."""
    from mame_lightning.eval.fidelity import agreement, measure_image
    from mame_lightning.pipelines.generation import GenerationSettings, text2image
    from mame_lightning.pipelines.loading import load_folder
    from mame_lightning.pipelines.prompting import build_prompt
    from mame_lightning.runs.evaluation.inputs import attribute_combinations

    model = load_folder(folder, device=str(device), dtype="auto", scheduler="dpmsolver++")
    expected, measured = {"area": [], "view": []}, {"area": [], "view": []}
    for combo in attribute_combinations(model.metadata, prompts):
        settings = GenerationSettings(guidance=guidance, steps=24, seed=0, batch_size=batch, progress=False,
                                      accelerate=accelerate, deepcache_interval=interval)
        for result in text2image(model, build_prompt(model.metadata, attributes=combo), per_prompt, settings):
            seen = measure_image(result.image)
            for key in expected:
                if combo.get(key) is not None and seen[key] is not None:
                    expected[key].append(str(combo[key]))
                    measured[key].append(seen[key])
    scores = [agreement(expected[k], measured[k]) for k in expected if expected[k]]
    return float(np.mean(scores)) if scores else float("nan")


def add_fidelity(rows: list[dict], folder: Path, device: torch.device, guidance: float) -> None:
    """fidelity_delta (approximate - exact agreement) on the approximate text-to-image rows."""
    exact: dict[int, float] = {}
    for row in rows:
        if row["task"] != "text2image" or row["kind"] != "approx":
            continue
        interval = int(row["variant"].rsplit(" ", 1)[-1])
        if row["batch"] not in exact:
            exact[row["batch"]] = fidelity_agreement(folder, device, guidance, row["batch"], "none", 1)
        approx = fidelity_agreement(folder, device, guidance, row["batch"], "deepcache", interval)
        row["fidelity_delta"] = approx - exact[row["batch"]]
