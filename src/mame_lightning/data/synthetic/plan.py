"""How a synthetic raw set is made up: which image goes to which layout, with which ids,
attributes and acquisition variants.

Values are dealt out in fixed proportions and then shuffled (not drawn independently), so even a
24-image set holds every variant at least once and the area classes and densities are balanced.
Everything follows from the seed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from mame_lightning.data.dicom import normalise_vendor
from mame_lightning.data.synthetic.phantoms import AREA_CLASSES, DENSITIES

FORMAT_VERSION = 2  # bump when the drawing or the file layout changes, so old files are redrawn

VINDR_VENDORS = {"SIEMENS": 0.45, "Siemens Healthineers": 0.25, "Siemens": 0.15,
                 "Planmed": 0.08, "IMS s.r.l.": 0.07}
OMI_VENDORS = {"HOLOGIC, Inc.": 0.5, "Hologic, Inc.": 0.2, "HOLOGIC": 0.1,
               "GE MEDICAL SYSTEMS": 0.1, "Philips Digital Mammography Sweden AB": 0.05,
               "SIEMENS": 0.05}

# Acquisition variants, spread over the whole set (proportions; each present once n allows).
VARIANTS = {
    "compression": {"explicit": 0.65, "implicit": 0.15, "rle": 0.1, "jpeg2000": 0.1},
    "photometric": {"MONOCHROME2": 0.8, "MONOCHROME1": 0.2},
    "bits_stored": {16: 0.5, 14: 0.3, 12: 0.2},
    "voi": {"none": 0.4, "LINEAR": 0.45, "SIGMOID": 0.15},
    "view_code": {False: 0.85, True: 0.15},
    "series_laterality": {False: 0.85, True: 0.15},
}
LESION_MIX = {("mass",): 0.5, ("calcification",): 0.2, ("mass", "calcification"): 0.15,
              ("calcified_mass",): 0.15}
# Attributes drawn per layout: VinDr has XCCL views and a test split, OMI-DB special protocols.
LAYOUT_MIX = {
    "vindr": {"view": {"CC": 0.46, "MLO": 0.46, "XCCL": 0.08}, "manufacturer": VINDR_VENDORS,
              "implant": {False: 0.93, True: 0.07}, "special_protocol": {False: 1.0},
              "split": {"training": 0.8, "test": 0.2}},
    "omi": {"view": {"CC": 0.5, "MLO": 0.5}, "manufacturer": OMI_VENDORS,
            "implant": {False: 0.93, True: 0.07}, "special_protocol": {False: 0.9, True: 0.1},
            "split": {"training": 1.0}},
}

@dataclass(frozen=True)
class ImagePlan:
    """Everything that decides one file's bytes (its fingerprint is a hash of this)."""

    index: int
    layout: str  # "vindr" | "omi"
    path: str  # relative to the set root
    group: str  # VinDr study_id or OMI ClientID
    study_uid: str
    series_uid: str
    sop_uid: str
    image_id: str  # VinDr image_id (32 hex) or OMI SOP UID
    series_id: str
    patient: int
    view: str  # as written: CC, MLO or XCCL
    laterality: str
    density: str
    area: str
    lesions: tuple[str, ...]
    manufacturer: str
    implant: bool
    special_protocol: bool
    split: str
    birads: int
    compression: str
    photometric: str
    bits_stored: int
    voi: str
    view_code: bool
    series_laterality: bool


def spread(n: int, weights: dict, rng: np.random.Generator) -> list:
    """`n` values in the given proportions, shuffled; every value with a positive weight
    appears at least once when n is at least the number of such values."""
    keys = [k for k, w in weights.items() if w > 0]
    share = np.array([weights[k] for k in keys], float)
    share = share / share.sum() * n
    counts = np.floor(share).astype(int)
    if n >= len(keys):
        counts = np.maximum(counts, 1)
    while counts.sum() < n:
        counts[int(np.argmax(share - counts))] += 1
    while counts.sum() > n:
        over = np.where(counts > 1, counts - share, -np.inf)
        counts[int(np.argmax(over))] -= 1
    values = [k for k, c in zip(keys, counts) for _ in range(c)]
    order = rng.permutation(len(values))
    return [values[i] for i in order]


def _hex_id(rng: np.random.Generator) -> str:
    return rng.bytes(16).hex()


def _uid(hex_id: str) -> str:
    """A valid DICOM UID carrying the same 128 bits (the 2.25 UUID-derived form)."""
    return f"2.25.{int(hex_id, 16)}"


def phi_of(patient: int) -> dict[str, str]:
    """The fake identifiers written into the DICOMs of synthetic patient `patient`."""
    return {"patient_name": f"SYNTH^PATIENT^{patient:04d}", "patient_id": f"PID-SYN-{patient:04d}",
            "birth_date": f"{1940 + patient % 40}{1 + patient % 12:02d}{1 + patient % 28:02d}",
            "accession": f"ACC-SYN-{patient:04d}"}


def plan_set(n: int, seed: int = 0, lesion_fraction: float = 0.3, calcifications: bool = True,
             images_per_group: int = 4) -> list[ImagePlan]:
    """Assign layouts, ids, attributes and acquisition variants to `n` images."""
    if n < 1:
        raise ValueError(f"a synthetic set needs at least one image, got n={n}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
    rng = np.random.default_rng([seed, 1])
    layouts = ["vindr"] * ((n + 1) // 2) + ["omi"] * (n // 2)
    mix = LESION_MIX if calcifications else {("mass",): 1.0}
    lesion_weights = {(): 1.0 - lesion_fraction} | {k: lesion_fraction * w for k, w in mix.items()}
    common = {"laterality": spread(n, {"L": 1, "R": 1}, rng),
              "density": spread(n, dict.fromkeys(DENSITIES, 1), rng),
              "area": spread(n, dict.fromkeys(AREA_CLASSES, 1), rng)}
    common |= {name: spread(n, weights, rng) for name, weights in VARIANTS.items()}
    plans: list[ImagePlan] = []
    patient = 0
    for layout in ("vindr", "omi"):
        indices = [i for i, name in enumerate(layouts) if name == layout]
        # Lesion kinds are dealt per layout, so each layout gets each kind once n allows.
        mixes = LAYOUT_MIX[layout] | {"lesions": lesion_weights}
        own = {k: spread(len(indices), w, rng) for k, w in mixes.items()}
        order = list(range(len(indices)))
        groups = [order[i:i + images_per_group] for i in range(0, len(order), images_per_group)]
        if layout == "omi":  # a client has lesions in NBSS or is healthy, never both
            lesion = [k for k in order if own["lesions"][k]]
            healthy = [k for k in order if not own["lesions"][k]]
            groups = [part[i:i + images_per_group] for part in (lesion, healthy)
                      for i in range(0, len(part), images_per_group)]
        for members in groups:
            group_hex, patient = _hex_id(rng), patient + 1
            group = group_hex if layout == "vindr" else f"demd{patient:05d}"
            study_uids = [_uid(group_hex)] * 2 if layout == "vindr" else \
                [_uid(_hex_id(rng)) for _ in range(2)]
            for position, k in enumerate(members):
                index = indices[k]
                image_hex, series_hex = _hex_id(rng), _hex_id(rng)
                values = {name: column[index] for name, column in common.items()}
                values |= {name: column[k] for name, column in own.items()}
                study_uid, sop_uid = study_uids[position // 2], _uid(image_hex)
                path = (f"vindr/images/{group}/{image_hex}.dicom" if layout == "vindr"
                        else f"omi/images/{group}/{study_uid}/{sop_uid}.dcm")
                birads = int(rng.choice([3, 4, 5]) if values["lesions"] else rng.choice([1, 1, 2]))
                plans.append(ImagePlan(
                    index=index, layout=layout, path=path, group=group, study_uid=study_uid,
                    series_uid=_uid(series_hex), sop_uid=sop_uid,
                    image_id=image_hex if layout == "vindr" else sop_uid, series_id=series_hex,
                    patient=patient, birads=birads, **values))
    return sorted(plans, key=lambda p: p.index)


def fingerprint(plan: ImagePlan, height: int, width: int, seed: int) -> str:
    text = json.dumps([FORMAT_VERSION, height, width, seed, asdict(plan)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def plan_counts(plans: list[ImagePlan]) -> dict[str, dict[str, int]]:
    """How many images have each value of each attribute (keys as text, sorted)."""
    def tally(values) -> dict[str, int]:
        return dict(sorted(Counter(str(v) for v in values).items()))

    fields = ["layout", "view", "laterality", "density", "area", "compression", "photometric",
              "bits_stored", "voi", "implant", "special_protocol", "view_code",
              "series_laterality", "split"]
    counts = {name: tally(getattr(p, name) for p in plans) for name in fields}
    counts["vendor"] = tally(normalise_vendor(p.manufacturer) for p in plans)
    counts["manufacturer"] = tally(p.manufacturer for p in plans)
    counts["lesions"] = tally("with" if p.lesions else "without" for p in plans)
    counts["lesion_kinds"] = tally(kind for p in plans for kind in p.lesions)
    return counts


__all__ = ["FORMAT_VERSION", "ImagePlan", "fingerprint", "phi_of", "plan_counts", "plan_set", "spread"]
