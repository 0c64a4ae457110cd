"""Quality of a small generated set, as watched during training (MAM-E 5.2: "quantitative metrics
during training time"), and the collapse guard that reads it.

A set is a few images per prompt, all from fixed seeds. Three numbers describe it:
- diversity: pairwise MS-SSIM within each prompt (`eval.msssim`); `diversity` = 1 - the largest
  per-prompt mean, so one prompt collapsing to near copies is enough to pull it to 0;
- prompt fidelity: the area class and view measured back on each image (`eval.fidelity`, the rulers
  that wrote the training prompts) against those the prompt asks for, pooled over attributes;
- its chance level: the agreement a generator that ignores its prompt would reach with the same
  images, i.e. each prompt scored against the measured values pooled over all prompts.
Prompts are free text; the attributes are read from their words ("CC view", "small area").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mame_lightning.eval.fidelity import AREA_LABELS, AREA_THRESHOLDS, VIEW_LABELS, measure_image, to_grey_uint8
from mame_lightning.eval.msssim import pairwise_ms_ssim

VIEW_WORD = re.compile(r"\b(" + "|".join(VIEW_LABELS) + r")\b(?:\s+view)?", re.IGNORECASE)


def prompt_attributes(prompt: str, area_labels: Sequence[str] = AREA_LABELS) -> dict[str, str]:
    """The measurable attributes a free-text prompt asks for: {"view": "CC"|"MLO", "area": label}."""
    found = {}
    view = VIEW_WORD.search(prompt or "")
    if view:
        found["view"] = view.group(1).upper()
    area = re.search(r"\b(" + "|".join(map(re.escape, area_labels)) + r")\s+(?:breast\s+)?area\b",
                     prompt or "", re.IGNORECASE)
    if area:
        found["area"] = next(label for label in area_labels if label.lower() == area.group(1).lower())
    return found


def diversity_scores(images_by_prompt: Mapping[str, Sequence[Any]]) -> dict:
    """Per prompt the mean pairwise MS-SSIM; `msssim` their mean, `diversity` 1 - the largest."""
    per_prompt = {prompt: float(pairwise_ms_ssim([to_grey_uint8(i) for i in images], progress=False).mean)
                  for prompt, images in images_by_prompt.items()}
    worst = max(per_prompt, key=per_prompt.get)
    return {"per_prompt": per_prompt, "msssim": float(np.mean(list(per_prompt.values()))),
            "diversity": 1.0 - per_prompt[worst], "least_diverse_prompt": worst}


def fidelity_scores(images_by_prompt: Mapping[str, Sequence[Any]], expected: Mapping[str, Mapping[str, str]],
                    thresholds: Sequence[float] = AREA_THRESHOLDS, labels: Sequence[str] = AREA_LABELS) -> dict:
    """Agreement of measured with asked-for attributes, per attribute and pooled, with chance levels.

    Images whose attribute cannot be measured (no tissue) are left out of that attribute. `fidelity`
    is None when no prompt asks for a measurable attribute.
    """
    measured: dict[str, list[tuple[str, str]]] = {}  # attribute -> (expected, measured) per image
    for prompt, images in images_by_prompt.items():
        wants = expected.get(prompt) or {}
        if not wants:
            continue
        for image in images:
            values = measure_image(to_grey_uint8(image), tuple(thresholds), tuple(labels), view="view" in wants)
            for attribute, want in wants.items():
                if values.get(attribute) is not None:
                    measured.setdefault(attribute, []).append((want, str(values[attribute])))
    result: dict[str, Any] = {"attributes": {}}
    hits = chance = total = 0.0
    for attribute, pairs in measured.items():
        pooled = Counter(got for _, got in pairs)
        agree = sum(want == got for want, got in pairs)
        expected_by_chance = sum(pooled[want] / len(pairs) for want, _ in pairs)
        result["attributes"][attribute] = {"agreement": agree / len(pairs), "chance": expected_by_chance / len(pairs),
                                           "n": len(pairs)}
        hits, chance, total = hits + agree, chance + expected_by_chance, total + len(pairs)
    result["fidelity"] = hits / total if total else None
    result["chance"] = chance / total if total else None
    return result


def quality_scalars(diversity: Mapping, fidelity: Mapping, kid: Mapping | None = None, prefix: str = "quality") -> dict:
    """The flat {name: value} a logger takes (per-prompt MS-SSIM under `<prefix>/msssim/<prompt>`)."""
    scalars = {f"{prefix}/msssim": diversity["msssim"], f"{prefix}/diversity": diversity["diversity"]}
    scalars.update({f"{prefix}/msssim/{prompt}": value for prompt, value in diversity["per_prompt"].items()})
    if fidelity.get("fidelity") is not None:
        scalars[f"{prefix}/fidelity"] = fidelity["fidelity"]
        scalars[f"{prefix}/fidelity_chance"] = fidelity["chance"]
    for attribute, entry in fidelity.get("attributes", {}).items():
        scalars[f"{prefix}/fidelity_{attribute}"] = entry["agreement"]
    if kid:
        scalars[f"{prefix}/kid"] = kid["kid_mean"]
        scalars[f"{prefix}/kid_std"] = kid["kid_std"]
    return {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}


@dataclass
class CollapseGuard:
    """Alarms when the generator collapses: its images become near copies (`diversity` below
    `min_diversity`), or its prompt fidelity has not improved for `patience` evaluations.

    A fidelity of 1 counts as improved (nothing is left to gain). None disables a check. The state
    (best fidelity, evaluations since) is a plain dict for checkpoints, so a resumed run counts on.
    """

    min_diversity: float | None = 0.05
    patience: int | None = None
    min_delta: float = 0.0
    best_fidelity: float | None = None
    stale: int = 0
    history: list = field(default_factory=list)

    def update(self, step: int, diversity: float | None, fidelity: float | None,
               least_diverse_prompt: str | None = None) -> list[str]:
        """Record one evaluation; returns the alarms it raises (empty when all is well)."""
        alarms = []
        if self.min_diversity is not None and diversity is not None and diversity < self.min_diversity:
            where = f" (prompt {least_diverse_prompt!r})" if least_diverse_prompt else ""
            alarms.append(f"diversity {diversity:.4f} < min_diversity {self.min_diversity:g} at step {step}: "
                          f"the images of one prompt are near copies (pairwise MS-SSIM {1 - diversity:.4f}){where}")
        if fidelity is not None:
            if self.best_fidelity is None or fidelity > self.best_fidelity + self.min_delta or fidelity >= 1.0:
                self.best_fidelity = max(fidelity, self.best_fidelity if self.best_fidelity is not None else fidelity)
                self.stale = 0
            else:
                self.stale += 1
            if self.patience is not None and self.stale >= self.patience:
                alarms.append(f"prompt fidelity has not improved for {self.stale} evaluations (best "
                              f"{self.best_fidelity:.3f}, now {fidelity:.3f} at step {step}; patience {self.patience})")
        self.history.append({"step": int(step), "diversity": diversity, "fidelity": fidelity, "alarms": alarms})
        return alarms

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("best_fidelity", "stale", "history")}

    def load_state_dict(self, state: Mapping) -> None:
        self.best_fidelity = state.get("best_fidelity")
        self.stale = int(state.get("stale", 0))
        self.history = list(state.get("history") or [])


__all__ = ["CollapseGuard", "diversity_scores", "fidelity_scores", "prompt_attributes", "quality_scalars"]
