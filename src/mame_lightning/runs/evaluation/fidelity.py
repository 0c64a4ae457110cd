"""`mode=fidelity`: does the image show what the prompt asked for? Breast area (and view) per combination.

k images per trained attribute combination at `fidelity.guidance`; each is measured and the
asked-for against measured classes make a confusion matrix per attribute. Writes fidelity.json,
fidelity_images.csv, fidelity_<attribute>.png and fidelity_grid.png (a row per combination).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mame_lightning.eval.report import write_csv
from mame_lightning.io import write_json
from mame_lightning.pipelines.generation import text2image
from mame_lightning.pipelines.loading import LoadedModel
from mame_lightning.runs.evaluation.grids import sample_grid, save_sample_grid
from mame_lightning.runs.evaluation.inputs import attribute_combinations, generation_settings


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


__all__ = ["fidelity_labels", "fidelity_model"]
