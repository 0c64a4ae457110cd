"""The full flow: text-to-image, a lesion box (given or sampled in tissue), inpainting, VinDr-style CSV."""

from __future__ import annotations

import ast
import csv
import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from helpers.generation import SIZE, breast_image
from mame_lightning.data.tissue import tissue_mask
from mame_lightning.pipelines.full import (
    FINDING_COLUMNS,
    FINDINGS_FILE,
    box_side,
    fitting_corners,
    run_full,
    sample_lesion_box,
)
from mame_lightning.pipelines.generation import GenerationSettings, repaint_region
from mame_lightning.pipelines.loading import model_label
from mame_lightning.pipelines.marking import read_png_text

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = GenerationSettings(steps=2, seed=4, progress=False)


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask > 0)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def test_fitting_corners_agree_with_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        tissue = rng.random((12, 15)) < 0.8
        for side in (1, 2, 3):
            brute = {(r, c) for r in range(12 - side + 1) for c in range(15 - side + 1)
                     if tissue[r : r + side, c : c + side].all()}
            assert {tuple(p) for p in fitting_corners(tissue, side)} == brute


def test_sampled_box_lies_inside_the_tissue_and_follows_the_seed():
    image = breast_image(seed=2)
    tissue = tissue_mask(image)
    boxes = [sample_lesion_box(image, 10, seed) for seed in range(6)]
    for box in boxes:
        assert (box.x1 - box.x0, box.y1 - box.y0) == (10, 10) and box.category == "Mass"
        assert tissue[int(box.y0) : int(box.y1), int(box.x0) : int(box.x1)].all()
    assert sample_lesion_box(image, 10, 3) == boxes[3]
    assert len({(b.x0, b.y0) for b in boxes}) > 1
    with pytest.raises(ValueError, match="lesion_box_size"):
        sample_lesion_box(image, SIZE, 0)


def test_box_side_is_a_fraction_below_one_else_pixels():
    assert box_side(0.125, 64) == 8 and box_side(10, 64) == 10
    for bad in (0, -1, 65):
        with pytest.raises(ValueError):
            box_side(bad, 64)


def test_full_flow_with_a_given_box_writes_agreeing_image_mask_and_csv(t2i_model, inpaint_model, tmp_path):
    findings = run_full(t2i_model, inpaint_model, "a siemens mammogram in MLO view", tmp_path, n=2, settings=FAST,
                        box="20.5,16,36,30", view="MLO", density="high", dicom=True)
    rows = _read_csv(tmp_path / FINDINGS_FILE)
    assert list(rows[0]) == FINDING_COLUMNS and len(rows) == 2 == len(findings)
    radius = inpaint_model.vae_scale_factor
    for row in rows:
        image_id = row["image_id"]
        mask = _png(tmp_path / "masks" / f"{image_id}.png")
        box = tuple(int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        assert box == _bbox(mask) == (20, 16, 36, 30)  # the given box, grown to whole pixels
        assert ast.literal_eval(row["finding_categories"]) == ["Mass"]
        assert (row["laterality"], row["view_position"], row["breast_density"]) == ("L", "MLO", "DENSITY C")
        assert (int(row["height"]), int(row["width"])) == (SIZE, SIZE)
        healthy = _png(tmp_path / "healthy" / f"{image_id}.png").astype(int)
        lesion = _png(tmp_path / "images" / f"{image_id}.png").astype(int)
        outside = ~repaint_region(mask, radius)
        assert np.abs(lesion - healthy)[outside].mean() < 0.5
        assert np.abs(lesion - healthy)[mask > 0].mean() > 2
        text = read_png_text(tmp_path / "images" / f"{image_id}.png")
        assert text["synthetic"] == "true" and text["task"] == "full"
        assert text["prompt"] == "a siemens mammogram in MLO view"
        assert text["lesion_prompt"] == "a mammogram with a lesion" and text["lesion_box"] == "20,16,36,30"
        assert text["inpaint_model"] == model_label(inpaint_model.path) == "generation_models/export_inpaint"
        assert text["model"] == model_label(t2i_model.path)
        ds = pydicom.dcmread(tmp_path / "images" / f"{image_id}.dcm")
        assert ds.Modality == "MG" and "a mammogram with a lesion" in ds.ImageComments
    assert rows[0]["image_id"] != rows[1]["image_id"]
    index = _read_csv(tmp_path / "images.csv")
    assert [r["file"] for r in index] == [f"images/{r['image_id']}.png" for r in rows]
    assert [int(r["seed"]) for r in index] == [4, 5]
    assert json.loads((tmp_path / "timings.json").read_text())["n"] == 2


def test_full_flow_samples_boxes_inside_the_generated_breast(t2i_model, inpaint_model, tmp_path):
    run_full(t2i_model, inpaint_model, "a mammogram in CC view", tmp_path / "a", n=2, settings=FAST,
             lesion_box_size=0.125)
    rows = _read_csv(tmp_path / "a" / FINDINGS_FILE)
    for row in rows:
        x0, y0, x1, y1 = (int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        assert (x1 - x0, y1 - y0) == (8, 8)
        assert _bbox(_png(tmp_path / "a" / "masks" / f"{row['image_id']}.png")) == (x0, y0, x1, y1)
        healthy = _png(tmp_path / "a" / "healthy" / f"{row['image_id']}.png")
        assert tissue_mask(healthy)[y0:y1, x0:x1].all()
    # The same seed gives the same boxes and images again.
    run_full(t2i_model, inpaint_model, "a mammogram in CC view", tmp_path / "b", n=1, settings=FAST,
             lesion_box_size=0.125)
    again = _read_csv(tmp_path / "b" / FINDINGS_FILE)[0]
    assert again == rows[0]
    first = _png(tmp_path / "a" / "images" / f"{rows[0]['image_id']}.png").astype(int)
    assert np.abs(_png(tmp_path / "b" / "images" / f"{again['image_id']}.png") - first).max() <= 1
