"""The utility study, start to finish: checks, split, synthesis, arms × seeds, report.

Every check on the input (model folders and their tasks, split sizes, arm names, the synthesis
time budget) runs before the first training step. Each stage is timed with the machine's load
beside it, because a shared CPU can double a figure.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mame_lightning.utility.checks import UtilityError, check_model_folder, check_positive
from mame_lightning.utility.classifier import probabilities
from mame_lightning.utility.fit import fit_classifier
from mame_lightning.utility.images import ImageSet, concat, load_image_set
from mame_lightning.utility.metrics import auroc, bootstrap_auroc_ci, roc_curve, sensitivity_at_specificity
from mame_lightning.utility.report import plot_arm_roc, plot_overlays, summarise_arm, write_report
from mame_lightning.utility.saliency import chance_level, localisation, peak, saliency_maps
from mame_lightning.utility.split import real_samples, split_by_group, split_counts
from mame_lightning.utility.synthesis import SynthesisSettings, generate_synthetic, synthetic_samples

# arm -> (uses the real training split, uses the synthetic set)
ARMS = {"real": (True, False), "real+synthetic": (True, True), "synthetic": (False, True)}


class Stages:
    """Wall time and 1-minute load average at the start and end of each stage."""

    def __init__(self):
        self.records: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"==> {name}", flush=True)
        load, started = os.getloadavg()[0], time.perf_counter()
        yield
        record = {"stage": name, "seconds": round(time.perf_counter() - started, 2),
                  "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2)}
        self.records.append(record)
        print(f"    done in {record['seconds']:.0f} s (load {record['load_start']:.2f} -> {record['load_end']:.2f})",
              flush=True)


def check_arms(cfg: DictConfig) -> list[str]:
    arms = [str(a) for a in cfg.arms]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise UtilityError(f"arms={arms}: choose from {', '.join(ARMS)}")
    if not list(cfg.seeds):
        raise UtilityError("seeds=[]: give at least one seed, e.g. seeds=[0,1,2]")
    return arms


def ensure_prepared(cfg: DictConfig) -> Path:
    """The phantom default prepares itself on first use, like training does; other sets must exist."""
    prepared = Path(str(cfg.prepared_dir))
    if (prepared / "text2image" / "metadata.jsonl").is_file():
        return prepared
    dataset = cfg.get("dataset")
    if dataset is not None and dataset.get("prepare_on_first_use") and Path(str(dataset.prepared_dir)) == prepared:
        from mame_lightning.data.prepare.preparation import prepare_from_config

        prepare_from_config(OmegaConf.create({"dataset": OmegaConf.to_container(dataset, resolve=True)}))
        return prepared
    raise UtilityError(f"prepared_dir={prepared} holds no prepared set (text2image/metadata.jsonl); "
                       "prepare it with `python -m mame_lightning.prepare dataset=... dataset.prepared_dir=...`")


def synthesis_settings(cfg: DictConfig) -> SynthesisSettings:
    s = cfg.synthesis
    box = s.get("box")
    box = None if box is None else (box if isinstance(box, str) else ",".join(str(v) for v in box))
    return SynthesisSettings(steps=int(s.steps), guidance=float(s.guidance), scheduler=str(s.scheduler),
                             seed=int(s.seed), lesion_prompt=s.get("lesion_prompt"),
                             lesion_box_size=float(s.lesion_box_size), box=box, budget_s=float(s.budget_s),
                             device=str(s.device), dtype=str(s.dtype))


def evenly(indices: list[int], k: int) -> list[int]:
    if len(indices) <= k:
        return list(indices)
    return [indices[i] for i in np.unique(np.linspace(0, len(indices) - 1, k).round().astype(int))]


def lesion_view(module, data: ImageSet, cfg: DictConfig) -> dict:
    """Probabilities of every image, and saliency + localisation over the lesion images."""
    probs = probabilities(module, data.images)
    lesions = data.lesion_indices
    maps = saliency_maps(module, data.images[lesions], method=str(cfg.saliency.method),
                         target_layer=cfg.saliency.get("target_layer"), mask_size=int(cfg.saliency.mask_size),
                         overlap=float(cfg.saliency.overlap))
    return {"probs": probs, "lesions": lesions, "maps": maps,
            "localisation": localisation(maps, [data.boxes[i] for i in lesions])}


def overlay_items(data: ImageSet, view: dict, k: int) -> list[dict]:
    items = []
    for position in evenly(list(range(len(view["lesions"]))), k):
        index = view["lesions"][position]
        items.append({"image": data.images[index, 0].numpy(), "saliency": view["maps"][position],
                      "boxes": data.boxes[index], "probability": float(view["probs"][index]),
                      "peak": peak(view["maps"][position]), "hit": view["localisation"]["hits"][position]})
    return items


def score_run(module, test: ImageSet, val: ImageSet, cfg: DictConfig, seed: int) -> tuple[dict, dict]:
    view = lesion_view(module, test, cfg)
    sensitivity, threshold = sensitivity_at_specificity(view["probs"], test.labels, float(cfg.report.specificity))
    run = {"seed": int(seed), "auroc": auroc(view["probs"], test.labels), "sensitivity_at_specificity": sensitivity,
           "threshold": threshold, "localisation": view["localisation"]["share"],
           "val_auroc": auroc(probabilities(module, val.images), val.labels), "roc": roc_curve(view["probs"], test.labels),
           "probabilities": view["probs"].tolist()}
    return run, view


def run_arm(name: str, cfg: DictConfig, sets: dict[str, ImageSet], out: Path, stage: Stages) -> dict:
    use_real, use_synthetic = ARMS[name]
    train = concat(*[s for s, used in ((sets["train"], use_real), (sets["synthetic"], use_synthetic)) if used])
    arm = {"train_real": len(sets["train"]) if use_real else 0,
           "train_synthetic": len(sets["synthetic"]) if use_synthetic else 0, "runs": [], "on_synthetic_runs": []}
    overlays = None
    for seed in cfg.seeds:
        with stage(f"train and score: {name}, seed {seed}"):
            fitted = fit_classifier(cfg, train, sets["val"], int(seed), out / "runs" / name / f"seed{seed}")
            run, view = score_run(fitted.module, sets["test"], sets["val"], cfg, int(seed))
            run.update(steps=fitted.steps, seconds=fitted.seconds, selected=fitted.selected)
            arm["runs"].append(run)
            wanted = len(sets["synthetic"]) and (overlays is None or not use_synthetic)
            synthetic_view = lesion_view(fitted.module, sets["synthetic"], cfg) if wanted else None
            if synthetic_view and not use_synthetic:
                arm["on_synthetic_runs"].append({"seed": int(seed), "localisation": synthetic_view["localisation"]["share"],
                                                 "auroc": auroc(synthetic_view["probs"], sets["synthetic"].labels)})
            if overlays is None:
                k = int(cfg.report.overlays)
                overlays = {"real": overlay_items(sets["test"], view, k),
                            "synthetic": overlay_items(sets["synthetic"], synthetic_view, k) if synthetic_view else []}
    arm["steps"] = arm["runs"][0]["steps"]
    arm["summary"] = summarise_arm(arm["runs"])
    arm["auroc_ci"] = bootstrap_auroc_ci([r["probabilities"] for r in arm["runs"]], sets["test"].labels,
                                         int(cfg.report.bootstrap), float(cfg.report.ci_level), int(cfg.split.seed))
    if arm["on_synthetic_runs"]:
        arm["on_synthetic"] = summarise_arm(arm["on_synthetic_runs"])
    arm["roc_plot"] = str(plot_arm_roc(name, arm["runs"], out / f"roc_{name.replace('+', '_')}.png", arm["auroc_ci"]))
    arm["overlays"] = overlays
    return arm


def run(cfg: DictConfig) -> dict:
    """The whole study; returns what utility.json holds."""
    stage, out = Stages(), Path(str(cfg.out))
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    with stage("check the input"):
        arms = check_arms(cfg)
        wants_synthetic = any(ARMS[a][1] for a in arms)
        models = {}
        if wants_synthetic:
            n_synthetic = check_positive(cfg.n_synthetic, "n_synthetic")
            models = {task: check_model_folder(cfg[key], task, key)
                      for task, key in (("text2image", "text2image_model"), ("inpaint", "inpaint_model"))}
        prepared = ensure_prepared(cfg)
        sides = split_by_group(real_samples(prepared, list(cfg.split.group_keys)), cfg.split.fractions,
                               int(cfg.split.seed), int(cfg.split.min_per_class), where=f"prepared_dir={prepared}")
    synthesis = {"n": 0}
    synthetic = []
    if wants_synthetic:
        with stage(f"generate {n_synthetic} synthetic lesion images (+ healthy controls)"):
            synthesis = generate_synthetic(models["text2image"], models["inpaint"], n_synthetic,
                                           synthesis_settings(cfg), out / "synthetic")
            synthetic = synthetic_samples(out / "synthetic", synthesis)
            synthesis = {**{k: v for k, v in synthesis.items() if k != "fingerprint"}, "folder": str(out / "synthetic")}
    with stage("load images"):
        size = int(cfg.image_size)
        sets = {name: load_image_set(items, size) for name, items in sides.items()}
        sets["synthetic"] = load_image_set(synthetic, size)
    results = {name: run_arm(name, cfg, sets, out, stage) for name in arms}
    with stage("report"):
        test = sets["test"]
        overlays = plot_overlays({name: arm.pop("overlays") for name, arm in results.items()},
                                 out / "gradcam_real_vs_synthetic.png", str(cfg.saliency.method))
        result = {
            "settings": {"prepared_dir": str(prepared), "text2image_model": str(models.get("text2image", "")),
                         "inpaint_model": str(models.get("inpaint", "")), "n_synthetic": synthesis["n"],
                         "seeds": [int(s) for s in cfg.seeds], "arms": arms, "image_size": size,
                         "network": OmegaConf.to_container(cfg.network, resolve=True),
                         "classifier": OmegaConf.to_container(cfg.classifier, resolve=True),
                         "saliency": str(cfg.saliency.method), "specificity": float(cfg.report.specificity),
                         "bootstrap": int(cfg.report.bootstrap), "ci_level": float(cfg.report.ci_level)},
            "split": split_counts(sides),
            "synthesis": synthesis,
            "arms": results,
            "localisation_chance": chance_level(test.images[test.lesion_indices],
                                                [test.boxes[i] for i in test.lesion_indices]),
            "files": {"overlays": str(overlays) if overlays else None},
            "device": f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {os.cpu_count()} cores",
        }
    result["stages"] = stage.records
    return write_report(result, out)
