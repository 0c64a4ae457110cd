"""`python -m mame_lightning.generate`: text-to-image, attributes, inpainting by box, the full flow, errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from helpers.dicom_validator import DCIODVFY, validate
from mame_lightning import generate
from mame_lightning.data.dicom import tag_metadata
from mame_lightning.pipelines.inputs import input_label
from mame_lightning.pipelines.marking import read_png_text
from mame_lightning.runs import generation

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
FAST = ["steps=2", "device=cpu", "progress=false"]


def run_cli(monkeypatch, *args: str) -> None:
    """The console entry in this process (argv as the shell would hand it over)."""
    monkeypatch.setattr(sys, "argv", ["generate", *args])
    generate.cli()


def test_overrides_hydra_would_misread_are_protected():
    fixed = generation.protect_overrides(["box=1,2,3,4", "prompt=a mammogram, CC view: it's", "n=2", "box=[1,2,3,4]",
                                        "negative_prompt='white'", "+lesion_prompt=a, b"])
    assert fixed == ["box=[1,2,3,4]", "prompt='a mammogram, CC view: it\\'s'", "n=2", "box=[1,2,3,4]",
                     "negative_prompt='white'", "+lesion_prompt='a, b'"]


def test_cli_subprocess_writes_n_marked_pngs_and_dicoms(t2i_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mame_lightning.generate", f"model_path={t2i_dir}", "vendor=siemens", "view=MLO",
         "density=C", "area=small", "n=3", "seed=10", "dicom=true", f"out={out}", *FAST],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and len(list(out.glob("*.dcm"))) == 3
    expected = "a siemens mammogram in MLO view with high density and small area"
    assert expected in proc.stdout and "s per image" in proc.stdout
    seeds = sorted(int(read_png_text(p)["seed"]) for p in pngs)
    assert seeds == [10, 11, 12]
    assert all(read_png_text(p)["prompt"] == expected and read_png_text(p)["synthetic"] == "true" for p in pngs)
    dicom = sorted(out.glob("*.dcm"))[0]
    ds = pydicom.dcmread(dicom)
    assert tag_metadata(ds)["view"] == "MLO" and ds.PatientName.family_name == "SYNTHETIC"
    if DCIODVFY:  # the standard's validator judges what the command wrote (skipped tests elsewhere say why)
        assert validate(dicom).errors == [], validate(dicom).describe()
    assert not list(tmp_path.glob("*.log")) and not (tmp_path / ".hydra").exists()


def test_missing_model_folder_names_it_and_how_to_get_one(monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as err:
        run_cli(monkeypatch, f"model_path={tmp_path / 'no_model'}", f"out={tmp_path}", *FAST)
    message = str(err.value.code)
    assert str(tmp_path / "no_model") in message and "mame_lightning.export" in message


def test_unknown_attribute_is_a_one_line_error(monkeypatch, t2i_dir, tmp_path):
    with pytest.raises(SystemExit) as err:
        run_cli(monkeypatch, f"model_path={t2i_dir}", "vendor=fuji", f"out={tmp_path}", *FAST)
    assert "fuji" in str(err.value.code) and "'siemens'" in str(err.value.code)


def test_inpainting_a_dicom_by_box_in_original_pixels(monkeypatch, inpaint_dir, tmp_path):
    from mame_lightning.data.dicom_writer import make_mammogram_dataset, save_dataset

    pixels = np.full((96, 80), 200, np.uint16)
    pixels[:, 40:] = 3000
    save_dataset(make_mammogram_dataset(pixels, laterality="R", view="CC"), tmp_path / "in.dcm")
    out = tmp_path / "out"
    run_cli(monkeypatch, f"model_path={inpaint_dir}", f"image={tmp_path / 'in.dcm'}", "box=50,40,70,60", "n=2",
            f"out={out}", *FAST)
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    cols = np.nonzero(mask.any(axis=0))[0]
    assert cols.max() < 32  # x 50..70 of a right breast lands on the left after the flip
    with open(out / "images.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and rows[0]["prompt"] == "a mammogram with a lesion"
    text = read_png_text(out / rows[0]["file"])
    assert text["box"] == "50,40,70,60" and text["image"] == input_label(tmp_path / "in.dcm")


def test_full_mode_from_the_command_line(monkeypatch, t2i_dir, inpaint_dir, tmp_path):
    out = tmp_path / "full"
    run_cli(monkeypatch, "mode=full", f"model_path={t2i_dir}", f"inpaint_model_path={inpaint_dir}",
            "vendor=hologic", "view=cc", "density=c", "area=big", "lesion_prompt=a mammogram with a lesion", "n=1",
            "box=10,12,26,28", f"out={out}", *FAST)
    with open(out / "finding_annotations.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert (row["xmin"], row["ymin"], row["xmax"], row["ymax"]) == ("10", "12", "26", "28")
    assert row["view_position"] == "CC" and row["breast_density"] == "DENSITY C"
    assert row["finding_categories"] == "['Mass']"
    text = read_png_text(out / "images" / f"{row['image_id']}.png")
    assert text["prompt"] == "a hologic mammogram in CC view with high density and big area"
    assert text["lesion_prompt"] == "a mammogram with a lesion" and text["synthetic"] == "true"


def test_mode_and_model_must_agree(monkeypatch, t2i_dir, inpaint_dir, tmp_path):
    with pytest.raises(SystemExit, match="inpaint_model_path"):
        run_cli(monkeypatch, "mode=full", f"model_path={t2i_dir}", f"out={tmp_path}", *FAST)
    with pytest.raises(SystemExit, match="image=FILE"):
        run_cli(monkeypatch, f"model_path={inpaint_dir}", f"out={tmp_path}", *FAST)
    with pytest.raises(SystemExit, match="needs a text2image model"):
        run_cli(monkeypatch, "mode=text2image", f"model_path={inpaint_dir}", f"out={tmp_path}", *FAST)


def test_deepcache_from_the_command_line_is_recorded_in_every_png(monkeypatch, t2i_dir, tmp_path):
    out = tmp_path / "quick"
    run_cli(monkeypatch, f"model_path={t2i_dir}", "prompt=a mammogram in CC view", "n=2", "batch_size=2",
            "accelerate=deepcache", "deepcache.interval=2", f"out={out}", *FAST)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    assert {read_png_text(p)["accelerate"] for p in pngs} == {"deepcache interval 2"}
