"""`mode=fid`: FID and KID of generated images against a real set, drawn with the real set's prompts.

Without local Inception weights (or torch-fidelity) the mode is skipped with the reason before any
image is generated; `eval.fid.feature` swaps in another backbone. Writes fid.json and, with
`eval.fid.save_images`, the generated images (marked synthetic) in generated/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mame_lightning.io import write_json
from mame_lightning.pipelines.generation import text2image
from mame_lightning.pipelines.loading import LoadedModel
from mame_lightning.runs.evaluation.inputs import generation_settings, image_entries, load_images, sweep_prompts


def fid_skip_reason(cfg: DictConfig, feature) -> str | None:
    """Why FID cannot run here (no weights file, no torch-fidelity), or None; a given backbone always runs."""
    from mame_lightning.eval.fid import skip_reason

    return None if feature is not None else skip_reason(cfg.eval.fid.weights)


def real_set(cfg: DictConfig) -> tuple[list, list[np.ndarray]]:
    """The real images FID compares against (a seeded sample of at most max_real) and their entries."""
    entries = image_entries(cfg.real_dir, "real_dir", split=cfg.eval.fid.split)
    limit = cfg.eval.fid.max_real
    if limit and len(entries) > int(limit):
        picks = np.sort(np.random.default_rng(int(cfg.seed)).choice(len(entries), int(limit), replace=False))
        entries = [entries[i] for i in picks]
    return entries, load_images([e.path for e in entries])


def fid_model(model: LoadedModel, label: str, cfg: DictConfig, out: Path, real_entries: list,
              real_images: list[np.ndarray], feature=None, tag: str = "") -> dict:
    """Generate eval.fid.n images with the real set's prompts (cycled) and compare the two sets."""
    from mame_lightning.eval.fid import fid_kid
    from mame_lightning.pipelines.outputs import save_results

    fcfg = cfg.eval.fid
    prompts = [e.prompt for e in real_entries if e.prompt] or sweep_prompts(cfg, model.metadata)
    wanted = [prompts[i % len(prompts)] for i in range(int(fcfg.n))]
    counts = dict.fromkeys(wanted, 0)
    for prompt in wanted:
        counts[prompt] += 1
    generated, seed = [], int(cfg.seed)
    with tqdm(total=len(wanted), desc=f"fid {label}", unit="image", disable=not cfg.progress) as bar:
        for prompt, count in counts.items():
            batch = text2image(model, prompt, count, generation_settings(cfg, cfg.guidance.scale, seed=seed))
            for result in batch:
                result.index = len(generated)
                generated.append(result)
            seed += count
            bar.update(count)
    if fcfg.save_images:
        save_results(generated, out / "generated", device=str(model.device))
    scores = fid_kid(real_images, [g.image for g in generated], fcfg.weights, int(fcfg.kid_subset_size),
                     int(fcfg.kid_subsets), feature=feature, batch_size=int(fcfg.batch_size),
                     device=model.device, seed=int(cfg.seed))
    result = {"model": label, "model_path": model.path, **(scores or {}), "guidance": float(cfg.guidance.scale),
              "real_dir": str(cfg.real_dir), "generated_dir": str(out / "generated") if fcfg.save_images else None}
    write_json(out / "fid.json", result)
    print(f"FID{tag}: {result['fid']:.2f}, KID {result['kid_mean']:.4f} ± "
          f"{result['kid_std']:.4f} ({result['n_real']} real, {result['n_fake']} generated): {out / 'fid.json'}")
    return result


__all__ = ["fid_skip_reason", "real_set", "fid_model"]
