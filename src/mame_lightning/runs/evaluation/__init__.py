"""Evaluation runs over trained models: guidance sweep (MAM-E Table 3), prompt fidelity, FID/KID, reader study.

Generation goes through `mame_lightning.pipelines` and the metrics through `mame_lightning.eval`; this
module only decides what to generate, in which order, and where the results go. Models are loaded
once and serve every mode asked for (`mode=all`), one model at a time to bound memory.
`python -m mame_lightning.evaluate` (conf/evaluate.yaml) is the command-line front end.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mame_lightning.eval.report import format_number, write_csv
from mame_lightning.evaluation_inputs import (EvaluationError, attribute_combinations, check_model_paths,
                                              generation_settings, image_entries, load_images, model_labels,
                                              model_paths, sample_grid, sweep_prompts, sweep_scales)
from mame_lightning.io import write_json, write_text
from mame_lightning.pipelines.generation import text2image
from mame_lightning.pipelines.loading import LoadedModel, load_model

MODES = ("sweep", "fidelity", "fid", "all", "reader_make", "reader_score", "inpaint_fidelity")
MODEL_MODES = ("sweep", "fidelity", "fid")
SUMMARY_FILE = "summary.json"


# ---------------------------------------------------------------- guidance sweep (Table 3)

def guidance_step_factor(scales: Sequence[float]) -> int:
    """TensorBoard steps are integers: guidance x this factor (1 for whole-number scales, 10 for 7.5, ...)."""
    for factor in (1, 10, 100, 1000):
        if all(abs(s * factor - round(s * factor)) < 1e-9 for s in scales):
            return factor
    return 1000


def sweep_cell(model: LoadedModel, label: str, prompt: str, scale: float, cfg: DictConfig) -> tuple[dict, list]:
    """Generate images_per_prompt images of one prompt at one scale; their MS-SSIM row and the images."""
    from mame_lightning.eval.msssim import pairwise_ms_ssim

    count = int(cfg.guidance.images_per_prompt)
    results = text2image(model, prompt, count, generation_settings(cfg, scale))
    images = [r.image for r in results]
    mean, std, values = result = pairwise_ms_ssim(images, progress=False)
    row = {"model": label, "prompt": prompt, "guidance": float(scale), "ms_ssim_mean": mean, "ms_ssim_std": std,
           "seconds_per_image": float(np.mean([r.seconds for r in results])), "n": len(images),
           "pairs": len(values), "steps": int(cfg.guidance.steps), "scheduler": model.scheduler,
           "seed": int(cfg.seed), "image_size": images[0].shape[0], "msssim_scales": result.settings["scales"],
           "msssim_kernel": result.settings["kernel_size"], "model_path": model.path}
    return row, images


def warm_up(model: LoadedModel, cfg: DictConfig, scale: float) -> None:
    """One untimed image: CUDA kernels and caches are set up before the first timed cell."""
    if cfg.get("warmup", True):
        text2image(model, "a mammogram", 1, generation_settings(cfg, scale))


def sweep_model(model: LoadedModel, label: str, cfg: DictConfig, scales: Sequence[float], out: Path) -> list[dict]:
    """Every (prompt, scale) cell of one model; sample grids per scale and TensorBoard scalars."""
    from torch.utils.tensorboard import SummaryWriter

    prompts = sweep_prompts(cfg, model.metadata)
    warm_up(model, cfg, scales[0])
    factor = guidance_step_factor(scales)
    writer = SummaryWriter(log_dir=str(out / "tensorboard" / label))
    writer.add_text("guidance_step", f"TensorBoard step = guidance scale x {factor}")
    rows = []
    bar = tqdm(total=len(prompts) * len(scales), desc=f"sweep {label}", unit="cell", disable=not cfg.progress)
    try:
        for scale in scales:
            step = int(round(scale * factor))
            grid_rows = []
            for prompt in prompts:
                row, images = sweep_cell(model, label, prompt, scale, cfg)
                rows.append(row)
                grid_rows.append(images[: int(cfg.grid_columns)])
                writer.add_scalar(f"msssim/{prompt}", row["ms_ssim_mean"], step)
                writer.add_scalar(f"msssim_std/{prompt}", row["ms_ssim_std"], step)
                writer.add_scalar(f"seconds_per_image/{prompt}", row["seconds_per_image"], step)
                bar.update(1)
                bar.set_postfix(w=format_number(scale), msssim=f"{row['ms_ssim_mean']:.3f}",
                                s_per_image=f"{row['seconds_per_image']:.2f}")
            mine = [r for r in rows if r["guidance"] == scale]
            writer.add_scalar("msssim/mean_over_prompts", float(np.mean([r["ms_ssim_mean"] for r in mine])), step)
            writer.add_scalar("seconds_per_image/mean", float(np.mean([r["seconds_per_image"] for r in mine])), step)
            grid = sample_grid(grid_rows)
            save_sample_grid(grid, out / "samples" / label / f"w{format_number(scale)}.png", model, scale, prompts)
            writer.add_image("samples", grid, step, dataformats="HW")
    finally:
        bar.close()
        writer.close()
    return rows


def save_sample_grid(grid: np.ndarray, path: Path, model: LoadedModel, scale: float, prompts: list[str]) -> Path:
    from mame_lightning.pipelines.marking import save_png

    return save_png(grid, path, {"model": model.path, "guidance": scale, "rows": " | ".join(prompts)})


def write_sweep_outputs(rows: list[dict], out: Path) -> dict:
    """sweep.csv, sweep.md (Table 3 shape) and msssim_vs_guidance.png from the rows of every model."""
    from mame_lightning.eval.msssim import guidance_sweep_table, write_guidance_sweep_csv
    from mame_lightning.eval.plots import plot_guidance_sweep

    rows = sorted(rows, key=lambda r: (str(r["model"]), float(r["guidance"])))
    table = guidance_sweep_table(rows)
    first = rows[0]
    seed = int(first.get("seed") or 0)
    caption = (f"Pairwise MS-SSIM (mean ± std over all pairs; lower = more diverse) of {first['n']} images per "
               f"prompt (seeds {seed}..{seed + int(first['n']) - 1} at every scale), {first.get('steps', '?')} "
               f"{first.get('scheduler', '')} steps, {first.get('image_size', '?')} px; s/image averaged over the row."
               "\n\n")
    write_guidance_sweep_csv(out / "sweep.csv", rows)
    write_text(out / "sweep.md", caption + table)
    plot = plot_guidance_sweep(rows, out / "msssim_vs_guidance.png")
    return {"csv": str(out / "sweep.csv"), "table": str(out / "sweep.md"), "plot": str(plot),
            "markdown": table, "rows": rows}


# ---------------------------------------------------------------- prompt fidelity

def fidelity_labels(cfg: DictConfig, metadata: dict) -> dict[str, list[str]]:
    """Confusion-matrix labels: the measurable classes plus any value the model knows beyond them."""
    from mame_lightning.eval.fidelity import VIEW_LABELS
    from mame_lightning.pipelines.prompting import known_values

    known = known_values(metadata)
    areas = list(dict.fromkeys([*map(str, cfg.fidelity.area_labels), *known["area"]]))
    views = list(dict.fromkeys([*known["view"], *VIEW_LABELS]))
    return {"area": areas, "view": views}


def fidelity_model(model: LoadedModel, label: str, cfg: DictConfig, out: Path, tag: str = "") -> dict:
    """Generate k images per trained attribute combination, measure area (and view), write the report."""
    from mame_lightning.eval.fidelity import fidelity_report, measure_image
    from mame_lightning.eval.plots import plot_confusion_matrix
    from mame_lightning.pipelines.prompting import build_prompt

    fcfg = cfg.fidelity
    combos = attribute_combinations(model.metadata, fcfg.max_prompts)
    labels = fidelity_labels(cfg, model.metadata)
    measurable = ["area"] + (["view"] if fcfg.measure_view else [])
    records, rows, grid_rows, prompts = [], [], [], []
    for combo in tqdm(combos, desc=f"fidelity {label}", unit="prompt", disable=not cfg.progress):
        prompt = build_prompt(model.metadata, attributes=combo)
        expected = {k: str(combo[k]) for k in measurable if combo.get(k) is not None}
        results = text2image(model, prompt, int(fcfg.images_per_prompt), generation_settings(cfg, fcfg.guidance))
        grid_rows.append([r.image for r in results[: int(cfg.grid_columns)]])
        prompts.append(prompt)
        for result in results:
            measured = measure_image(result.image, tuple(fcfg.area_thresholds), tuple(fcfg.area_labels),
                                     view=bool(fcfg.measure_view))
            records.append({"expected": expected, "measured": {k: measured[k] for k in expected}})
            rows.append({"prompt": prompt, "seed": result.seed, **{f"expected_{k}": v for k, v in expected.items()},
                         "measured_area": measured["area"], "area_ratio": round(measured["area_ratio"], 4),
                         "measured_view": measured["view"]})
    report = fidelity_report(records, labels)
    for attribute, entry in report.items():
        entry["chance"] = 1.0 / len(entry["labels"])
        if entry.get("matrix") is not None:
            entry["plot"] = str(plot_confusion_matrix(np.array(entry["matrix"]), entry["labels"],
                                                      out / f"fidelity_{attribute}.png",
                                                      title=f"{label}: {attribute} (prompt vs image)"))
    if "view" in report:
        report["view"]["method"] = "pectoral heuristic (validated on synthetic phantoms only)"
    result = {"model": label, "model_path": model.path, "scheduler": model.scheduler, "guidance": float(fcfg.guidance),
              "images_per_prompt": int(fcfg.images_per_prompt), "prompts": len(combos), "n_images": len(records),
              "attributes": report, "images_csv": str(out / "fidelity_images.csv")}
    # one row per attribute combination: what each prompt looks like, at a glance
    result["grid"] = str(save_sample_grid(sample_grid(grid_rows), out / "fidelity_grid.png", model,
                                          float(fcfg.guidance), prompts))
    result["grid_rows"] = prompts
    write_csv(out / "fidelity_images.csv", rows)
    write_json(out / "fidelity.json", result)
    print(f"fidelity{tag}: {out / 'fidelity.json'} (per image: {out / 'fidelity_images.csv'})")
    for attribute, entry in report.items():
        if entry.get("agreement") is not None:
            print(f"prompt fidelity{tag} — {attribute} agreement: "
                  f"{entry['agreement']:.2f} (chance {entry['chance']:.2f})")
    return result


# ---------------------------------------------------------------- FID / KID

def fid_skip_reason(cfg: DictConfig, feature) -> str | None:
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


# ---------------------------------------------------------------- model loop

def evaluate_models(cfg: DictConfig, out: Path, modes: Sequence[str], scales: Sequence[float] = (),
                    feature=None) -> dict:
    """Load each model once and run the asked-for modes on it; results by mode (fid/fidelity by model)."""
    paths = check_model_paths(model_paths(cfg))
    labels = model_labels(paths)
    results: dict[str, Any] = {}
    real_entries, real_images = [], []
    if "fid" in modes:
        if not cfg.real_dir:
            raise EvaluationError("mode=fid needs real_dir=PREPARED/text2image (the real images to compare with)")
        real_entries, real_images = real_set(cfg)
        reason = fid_skip_reason(cfg, feature)
        if reason:
            print(reason)
            results["fid"] = {"skipped": reason}
            modes = [m for m in modes if m != "fid"]
    rows: list[dict] = []
    for path, label in zip(paths, labels):
        if not modes:
            break
        several = len(paths) > 1
        model_out, tag = (out / label, f" ({label})") if several else (out, "")
        model = load_for(cfg, path, "project")
        if model.task != "text2image":
            raise EvaluationError(f"{path} is an {model.task} model; sweep, fidelity and fid evaluate text2image models")
        if "sweep" in modes:
            rows += sweep_model(model, label, cfg, scales, out)
        if "fidelity" in modes:
            results.setdefault("fidelity", {})[label] = fidelity_model(model, label, cfg, model_out, tag)
        if "fid" in modes:
            results.setdefault("fid", {})[label] = fid_model(model, label, cfg, model_out, real_entries,
                                                            real_images, feature, tag)
        del model
        release_memory()
    if rows:
        results["sweep"] = write_sweep_outputs(rows, out)
        results["sweep"].update(tensorboard=str(out / "tensorboard"), samples=str(out / "samples"))
        print(results["sweep"]["markdown"])
        print(f"sweep: {results['sweep']['csv']}, {results['sweep']['table']}, {results['sweep']['plot']}; "
              f"sample grids in {out / 'samples'}; tensorboard --logdir {out / 'tensorboard'}")
    return results


def load_for(cfg: DictConfig, path: str, default: str) -> LoadedModel:
    """`pipeline=stock`: plain `from_pretrained` (the folder's scheduler, fp32); project: our loader."""
    from mame_lightning.pipelines.stock import STOCK, load_stock

    kind = str(cfg.get("pipeline") or default)
    if kind not in (STOCK, "project"):
        raise EvaluationError(f"pipeline must be project or stock, got {kind!r}")
    if kind == STOCK:
        return load_stock(path, device=cfg.device)
    return load_model(path, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.guidance.scheduler)


def run_inpaint_fidelity(cfg: DictConfig, out: str | Path) -> dict:
    """Paint healthy images through real lesion masks with the plain pipeline (stock unless told)."""
    from mame_lightning.evaluation_inpaint import run_inpaint_fidelity as run_on

    path = check_model_paths(model_paths(cfg))[0]
    return run_on(cfg, Path(out), model=load_for(cfg, path, "stock"))


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_guidance_sweep(cfg: DictConfig, out: str | Path, scales: Sequence[float] | None = None) -> dict:
    return evaluate_models(cfg, Path(out), ["sweep"], scales or sweep_scales(cfg))["sweep"]


def run_fidelity(cfg: DictConfig, out: str | Path) -> dict:
    return evaluate_models(cfg, Path(out), ["fidelity"])["fidelity"]


def run_fid(cfg: DictConfig, out: str | Path, feature=None) -> dict:
    return evaluate_models(cfg, Path(out), ["fid"], feature=feature)["fid"]


# ---------------------------------------------------------------- reader study

def run_reader_make(cfg: DictConfig, out: str | Path) -> dict:
    from mame_lightning.eval.reader_study import make_reader_study

    if not cfg.real_dir or not cfg.fake_dir:
        raise EvaluationError("mode=reader_make needs real_dir=DIR and fake_dir=DIR")
    real = [e.path for e in image_entries(cfg.real_dir, "real_dir")]
    fake = [e.path for e in image_entries(cfg.fake_dir, "fake_dir")]
    key = make_reader_study(real, fake, out, n=int(cfg.n), real_fraction=float(cfg.real_fraction),
                            seed=int(cfg.seed), key_path=cfg.key, size=cfg.size, overwrite=bool(cfg.overwrite))
    print(f"reader study: {cfg.n} cases in {Path(out) / 'images'}, ratings sheet {Path(out) / 'ratings.csv'}\n"
          f"key: {key} (keep it away from the reader; score with mode=reader_score ratings=... key={key})")
    return {"images": str(Path(out) / "images"), "ratings": str(Path(out) / "ratings.csv"), "key": str(key),
            "n": int(cfg.n)}


def run_reader_score(cfg: DictConfig, out: str | Path) -> dict:
    from mame_lightning.eval.reader_study import score_reader_study

    if not cfg.ratings:
        raise EvaluationError("mode=reader_score needs ratings=FILE (the filled ratings.csv)")
    ratings = Path(cfg.ratings)
    key = Path(cfg.key) if cfg.key else ratings.parent / ".key" / "key.json"
    for path, what in ((ratings, "ratings sheet"), (key, "reader-study key (key=FILE)")):
        if not path.is_file():
            raise EvaluationError(f"{what} not found: {path}")
    summary = score_reader_study(ratings, key, out)
    print(f"reader study: AUROC {summary['auroc']:.3f} over {summary['n']} cases (0.5 = cannot tell); "
          f"ROC {summary['roc_plot']}")
    return summary


# ---------------------------------------------------------------- dispatch

def run(cfg: DictConfig, out: str | Path | None = None, multirun_overrides: Sequence[str] | None = None,
        feature=None) -> dict:
    """Run `cfg.mode` into `out` (default cfg.out) and write out/summary.json; returns the summary."""
    mode = str(cfg.mode)
    if mode not in MODES:
        raise EvaluationError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    out = Path(str(out if out is not None else cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"mode": mode, "out": str(out)}
    if mode == "reader_make":
        summary["reader_study"] = run_reader_make(cfg, out)
    elif mode == "reader_score":
        summary["reader_study"] = run_reader_score(cfg, out)
    elif mode == "inpaint_fidelity":
        summary["models"] = model_paths(cfg)
        summary["inpaint_fidelity"] = run_inpaint_fidelity(cfg, out)
    else:
        modes = MODEL_MODES if mode == "all" else (mode,)
        if mode == "all" and not cfg.real_dir:
            modes = ("sweep", "fidelity")
            summary["fid"] = {"skipped": "no real_dir given (real_dir=PREPARED/text2image)"}
            print(f"FID/KID skipped: {summary['fid']['skipped']}")
        scales = sweep_scales(cfg, multirun_overrides) if "sweep" in modes else []
        if feature is None and cfg.eval.fid.get("feature"):
            from hydra.utils import instantiate

            feature = instantiate(cfg.eval.fid.feature)
        summary["models"] = model_paths(cfg)
        summary["scales"] = list(scales)
        summary.update(evaluate_models(cfg, out, modes, scales, feature))
        if isinstance(summary.get("sweep"), dict):
            summary["sweep"].pop("markdown", None)
    summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json(out / SUMMARY_FILE, summary)
    print(f"results in {out} (summary: {out / SUMMARY_FILE})")
    return summary


class MultirunSweepTable(Callback):
    """After a multirun, one sweep table from every job's sweep.csv, in the sweep folder."""

    def __init__(self) -> None:
        self.folders: list[Path] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        value = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
        if isinstance(value, dict) and value.get("out"):
            self.folders.append(Path(value["out"]))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mame_lightning.eval.msssim import read_guidance_sweep_csv

        tables = [folder / "sweep.csv" for folder in self.folders if (folder / "sweep.csv").is_file()]
        if not tables:
            return
        rows = [row for table in tables for row in read_guidance_sweep_csv(table)]
        combined = write_sweep_outputs(rows, Path(config.hydra.sweep.dir))
        print(f"\ncombined sweep of {len(tables)} jobs: {combined['table']}\n{combined['markdown']}")
