"""Real images of a prepared set as labelled samples, split by patient/study.

A lesion classifier that saw one view of a study in training and is tested on the other view of the
same study is tested on what it has seen, so whole groups (patient, else study) go to one side.
Groups with lesions and groups without are split separately with the same fractions, so every
split holds both classes. The order is a hash of (seed, group): the same set and seed give the
same split on any machine, and adding a study moves no other study.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mame_lightning.data.loading.prepared_set import read_metadata, task_folder
from mame_lightning.utility.checks import UtilityError

LESION, HEALTHY = 1, 0
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image for the classifier. Boxes are (x0, y0, x1, y1) in the image's own pixels."""

    path: str
    label: int
    group: str
    origin: str = "real"
    id: str = ""
    boxes: tuple[tuple[float, float, float, float], ...] = field(default=())


def group_of(record: dict, group_keys) -> str:
    """A metadata field naming the patient or study when the set has one, else the folder the
    source file sits in (VinDr-Mammo: the study; OMI-DB: the study), else the image itself."""
    for key in group_keys or ():
        value = record.get(key)
        if value not in (None, ""):
            return f"{key}:{value}"
    parent = PurePosixPath(str(record.get("source") or "")).parent
    return f"folder:{parent}" if str(parent) not in ("", ".") else f"image:{record['id']}"


def real_samples(prepared_dir, group_keys=("patient_id", "study_id")) -> list[Sample]:
    """Healthy images (text2image/) and lesion images with their boxes (inpaint/) of a prepared set."""
    root = Path(prepared_dir)
    samples = []
    for task, label in (("text2image", HEALTHY), ("inpaint", LESION)):
        folder = task_folder(root, task)
        metadata = folder / "metadata.jsonl"
        if not metadata.is_file():
            raise UtilityError(f"prepared_dir={root}: {metadata} not found; prepare the set with "
                               "`python -m mame_lightning.prepare` first")
        for record in read_metadata(metadata, task):
            boxes = tuple(tuple(float(v) for v in box[:4]) for box in record.get("boxes") or ()) if label else ()
            samples.append(Sample(str(folder / record["file_name"]), label, group_of(record, group_keys),
                                  "real", str(record["id"]), boxes))
    return samples


def _rank(group: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def _cut(groups: list[str], fractions: dict[str, float]) -> dict[str, list[str]]:
    n = len(groups)
    n_test = round(fractions["test"] * n)
    n_val = round(fractions["val"] * n)
    return {"test": groups[:n_test], "val": groups[n_test:n_test + n_val], "train": groups[n_test + n_val:]}


def check_fractions(fractions) -> dict[str, float]:
    values = {name: float(fractions[name]) for name in SPLITS if name in fractions}
    if set(values) != set(SPLITS) or min(values.values()) <= 0 or abs(sum(values.values()) - 1) > 1e-6:
        raise UtilityError(f"split.fractions={dict(fractions)}: give train, val and test, each > 0, summing to 1")
    return values


def split_by_group(samples: list[Sample], fractions, seed: int = 0, min_per_class: int = 1,
                   where: str = "prepared set") -> dict[str, list[Sample]]:
    """train / val / test lists; no group on two sides; too few groups for both classes on every
    side is an error naming the counts."""
    fractions = check_fractions(fractions)
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_group[sample.group].append(sample)
    kinds = {LESION: [], HEALTHY: []}
    for group, members in by_group.items():
        kinds[LESION if any(s.label == LESION for s in members) else HEALTHY].append(group)
    sides = {name: [] for name in SPLITS}
    for groups in kinds.values():
        for name, chosen in _cut(sorted(groups, key=lambda g: _rank(g, seed)), fractions).items():
            sides[name] += [s for g in chosen for s in by_group[g]]
    for name in SPLITS:
        for label, what in ((LESION, "lesion"), (HEALTHY, "healthy")):
            count = sum(s.label == label for s in sides[name])
            if count < min_per_class:
                raise UtilityError(
                    f"{where}: {len(by_group)} studies ({len(kinds[LESION])} with lesions) are too few for the "
                    f"{'/'.join(f'{fractions[s]:g}' for s in SPLITS)} train/val/test split: {name} gets {count} "
                    f"{what} image(s), split.min_per_class={min_per_class}; add data or change split.fractions "
                    "(a study is the folder a source file sits in, or a metadata field of split.group_keys)")
    return {name: sorted(sides[name], key=lambda s: (s.label, s.id)) for name in SPLITS}


def split_counts(sides: dict[str, list[Sample]]) -> dict:
    """Images per class and studies per split, for the report."""
    return {name: {"images": len(items), "lesion": sum(s.label == LESION for s in items),
                   "healthy": sum(s.label == HEALTHY for s in items),
                   "studies": len({s.group for s in items})} for name, items in sides.items()}
