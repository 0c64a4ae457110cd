"""The synthetic raw phantoms against the standard's IOD validator (dciodvfy).

Every phantom is a Digital Mammography X-Ray Image For Presentation object without errors,
except for the oddities its plan puts there on purpose because real archives hold them and the
reader must cope: no VOI window (voi="none"), laterality only at series level.
"""

from __future__ import annotations

import pytest

from helpers.dicom_validator import needs_dciodvfy, validate
from mame_lightning.data.dicom_writer import make_mammogram_dataset, save_dataset
from mame_lightning.data.synthetic.plan import plan_set
from mame_lightning.data.synthetic.phantom_set import write_synthetic_set

N, SEED = 24, 5
MISSING_VOI = {"VOILUTSequence", "WindowCenter"}


def missing(verdict) -> set[str]:
    """Keywords of the attributes dciodvfy reports missing ('... Element=<Keyword> Module=<...>')."""
    return {line.split("Element=<", 1)[1].split(">", 1)[0] for line in verdict.errors if "Element=<" in line}


def intended_gaps(plan) -> set[str]:
    gaps = set()
    if plan.voi == "none":
        gaps |= MISSING_VOI
    if plan.series_laterality:
        gaps.add("ImageLaterality")
    return gaps


@needs_dciodvfy
def test_phantoms_fail_the_validator_only_where_a_variant_means_it(tmp_path):
    write_synthetic_set(tmp_path, N, height=64, width=52, seed=SEED, progress=False)
    plans = plan_set(N, seed=SEED)
    assert any(p.voi == "none" for p in plans) and any(p.series_laterality for p in plans)
    for plan in plans:
        verdict = validate(tmp_path / plan.path)
        assert verdict.iod == "MammographyImageForPresentation", verdict.describe()
        gaps = intended_gaps(plan)
        assert missing(verdict) == gaps, f"{plan.path} ({plan.voi=}, {plan.series_laterality=}):\n{verdict.describe()}"
        assert len(verdict.errors) == 2 * len(gaps), verdict.describe()  # each gap: module + macro line


@needs_dciodvfy
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("view", ["CC", "MLO", "XCCL"])
def test_a_default_mammogram_passes(photometric, view, tmp_path):
    import numpy as np

    pixels = np.tile(np.arange(40, dtype=np.uint16) * 50, (32, 1))
    ds = make_mammogram_dataset(pixels, photometric=photometric, view=view, laterality="R", window=(1000, 2000))
    save_dataset(ds, tmp_path / "a.dcm", "rle")
    verdict = validate(tmp_path / "a.dcm")
    assert verdict.errors == [], verdict.describe()
    assert ds.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")
