"""The preparation engine: filters, orientation, lesion masks, prompts, bad inputs, report."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mame_lightning.data.dicom_writer import make_mammogram_dataset, save_dataset
from mame_lightning.data.geometry import apply_image, box_mask, plan
from mame_lightning.data.prepare.preparation import prepare_dataset
from mame_lightning.data.records import Box
from mame_lightning.data.synthetic.plan import phi_of, plan_set
from helpers.preparation import HEIGHT, PHI, SIZE, WIDTH, add_view_modifier, all_lines, compose_prepare, read_lines, snapshot, write_bad_inputs, phantom_dataset, write_dicom, write_omi, write_vindr

GOOD = {"good/cc_left.dcm": dict(view="CC", laterality="L", vendor="siemens", seed=1),
        "good/mlo_right.dcm": dict(view="MLO", laterality="R", vendor="hologic", seed=2),
        "good/deep/IMG0003": dict(view="CC", laterality="L", vendor="other", seed=3)}
FILTERED = {  # file -> (dicom settings, filter kind, override that switches the filter off)
    "filt/xccl.dcm": (dict(view="XCCL"), "view", "dataset.filters.views=null"),
    "filt/ml.dcm": (dict(view="ML"), "view", "dataset.filters.views=null"),
    "filt/spot.dcm": (dict(view="CC"), "view", "dataset.filters.views=null"),
    "filt/cr.dcm": (dict(modality="CR"), "modality", "dataset.filters.modality=null"),
    "filt/processing.dcm": (dict(presentation_intent="FOR PROCESSING"), "presentation intent",
                            "dataset.filters.presentation_only=false"),
    "filt/implant.dcm": (dict(implant=True), "implant", "dataset.filters.exclude_implants=false"),
}


def image(out_dir, task, line):
    return np.asarray(Image.open(out_dir / task / line["file_name"]))


def tissue_left(img):
    third = img.shape[1] // 3
    return img[:, :third].mean() > img[:, -third:].mean() + 20


@pytest.fixture(scope="module")
def folder_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_raw")
    for rel, kwargs in GOOD.items():
        write_dicom(root / rel, **kwargs)
    for number, (rel, (kwargs, _, _)) in enumerate(FILTERED.items()):
        write_dicom(root / rel, seed=20 + number, **kwargs)
    add_view_modifier(root / "filt/spot.dcm", "spot compression")
    write_dicom(root / "odd/tag_r_drawn_l.dcm", laterality="R", drawn="L", seed=5)
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def folder_run(folder_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder_out")
    report = prepare_dataset(compose_prepare("folder", folder_raw, out))
    return out, report


def test_each_filter_drops_its_case_and_counts_it(folder_run):
    out, report = folder_run
    kinds = {entry["file"]: entry["kind"] for entry in report["filtered"]}
    assert kinds == {rel: kind for rel, (_, kind, _) in FILTERED.items()}
    assert all(entry["reason"] for entry in report["filtered"])
    assert report["counts"]["filtered"] == {"implant": 1, "modality": 1, "presentation intent": 1, "view": 3}
    kept = all_lines(out)
    assert set(kept) == set(GOOD) | {"odd/tag_r_drawn_l.dcm"}
    assert report["kept"] == len(kept) and report["counts"]["in"] == len(kept) + len(FILTERED)
    assert report["rejected"] == []


@pytest.mark.parametrize("kind", sorted({kind for _, kind, _ in FILTERED.values()}))
def test_each_filter_can_be_switched_off(folder_raw, tmp_path, kind):
    override = next(o for _, k, o in FILTERED.values() if k == kind)
    report = prepare_dataset(compose_prepare("folder", folder_raw, tmp_path, override))
    released = {rel for rel, (_, k, _) in FILTERED.items() if k == kind}
    assert released <= set(all_lines(tmp_path))
    assert kind not in {entry["kind"] for entry in report["filtered"]}


def test_vendor_filter_keeps_one_vendor(folder_raw, tmp_path):
    report = prepare_dataset(compose_prepare("folder", folder_raw, tmp_path, "dataset.filters.vendor=siemens"))
    vendors = {entry["file"] for entry in report["filtered"] if entry["kind"] == "vendor"}
    assert vendors == {"good/mlo_right.dcm", "good/deep/IMG0003"}
    assert {line["vendor"] for line in all_lines(tmp_path).values()} == {"siemens"}


def test_a_changed_setting_redoes_the_items(folder_raw, tmp_path):
    prepare_dataset(compose_prepare("folder", folder_raw, tmp_path))
    report = prepare_dataset(compose_prepare("folder", folder_raw, tmp_path,
                                             "dataset.templates.text2image='{area} {view} breast'"))
    assert report["run"]["processed"] == report["counts"]["in"] and report["run"]["reused"] == 0
    for line in all_lines(tmp_path).values():
        assert line["prompt"] == f"{line['area']} {line['view']} breast"


def test_right_breasts_are_flipped_chest_wall_left(folder_run):
    out, _ = folder_run
    lines = all_lines(out)
    right, left = lines["good/mlo_right.dcm"], lines["good/cc_left.dcm"]
    assert (right["laterality"], right["flipped"], left["flipped"]) == ("R", True, False)
    for line in (right, left):
        img = image(out, line["task"], line)
        assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8
        assert tissue_left(img)


def test_tag_contradicting_the_pixels_is_corrected_and_reported(folder_run):
    out, report = folder_run
    line = all_lines(out)["odd/tag_r_drawn_l.dcm"]
    assert line["laterality"] == "R" and line["flipped"] is False
    assert tissue_left(image(out, line["task"], line))
    files = [d["file"] for d in report["orientation_disagreements"]]
    assert files == ["odd/tag_r_drawn_l.dcm"]
    assert report["counts"]["orientation_disagreements"] == 1


def test_folder_ids_are_path_hashes_and_metadata_fields(folder_run):
    out, _ = folder_run
    for rel, line in all_lines(out).items():
        assert line["id"] not in rel and len(line["id"]) == 24
        assert line["file_name"] == f"images/{line['id']}.png"
        assert set(line) >= {"id", "file_name", "source", "prompt", "view", "laterality", "vendor",
                             "density", "area_ratio", "area", "split", "flipped"}
        assert line["density"] is None and 0 < line["area_ratio"] < 1
        assert line["area"] in ("small", "medium", "big")


def test_bad_inputs_are_rejected_with_path_and_reason(tmp_path):
    raw = tmp_path / "raw"
    expected = write_bad_inputs(raw)
    write_dicom(raw / "ok.dcm", seed=1)
    report = prepare_dataset(compose_prepare("folder", raw, tmp_path / "out"))
    reasons = {entry["file"]: entry["reason"].lower() for entry in report["rejected"]}
    assert set(reasons) == set(expected)
    for rel, words in expected.items():
        assert words in reasons[rel], (rel, reasons[rel])
    assert set(all_lines(tmp_path / "out")) == {"ok.dcm"}  # the run went on
    assert sum(report["counts"]["rejected"].values()) == len(expected)


def test_blank_images_and_duplicate_ids_are_rejected(tmp_path):
    raw = tmp_path / "raw"
    write_vindr(raw, [dict(image_id="same", study="s1", seed=1), dict(image_id="same", study="s2", seed=2),
                      dict(image_id="blank", study="s3", seed=3)])
    flat = make_mammogram_dataset(np.full((HEIGHT, WIDTH), 7, np.uint16), manufacturer="SIEMENS")
    save_dataset(flat, raw / "images/s3/blank.dicom")
    report = prepare_dataset(compose_prepare("vindr", raw, tmp_path / "out"))
    kinds = {(e["file"], e["kind"]) for e in report["rejected"]}
    assert kinds == {("images/s2/same.dicom", "duplicate id"), ("images/s3/blank.dicom", "no tissue")}
    assert report["kept"] == 1


@pytest.fixture(scope="module")
def mixed_raw(tmp_path_factory):
    """raw/vindr (VinDr layout) and raw/omi (OMI-DB layout), both with traps."""
    root = tmp_path_factory.mktemp("mixed_raw")
    write_vindr(root / "vindr", [
        dict(image_id="v_healthy", density="B", area="medium", seed=1),
        dict(image_id="v_multi", density="D", view="MLO", laterality="R", area="big",
             lesions=("mass", "calcification"), seed=2,
             extra_findings=[(["Mass"], (5, 0, 20, 8))]),  # above the crop
        dict(image_id="v_outside", density="C", seed=3, extra_findings=[(["Mass"], (10, 0, 40, 10))]),
        dict(image_id="v_hologic", vendor="hologic", seed=4),
        dict(image_id="v_missing", missing=True),
        dict(image_id="v_unboxed", seed=6, extra_findings=[(["Architectural Distortion"], None)]),
    ])
    write_omi(root / "omi", [
        dict(sop="1.1", area="big", seed=5),
        dict(sop="1.2", view="MLO", laterality="R", marks=[(60, 40, 20, 100, "Mass")], seed=6),
        dict(sop="1.3", extra={"SeriesDescription": "L CC MAGNIFICATION"}, seed=7),
        dict(sop="1.4", vendor="siemens", seed=8),
        dict(sop="1.5", implant=True, seed=9),
    ])
    return root


def _run(kind, raw, out, *overrides):
    return prepare_dataset(compose_prepare(kind, raw, out, *overrides)), all_lines(out)


def test_vindr_prompts_boxes_and_missing_file(mixed_raw, tmp_path):
    report, lines = _run("vindr", mixed_raw / "vindr", tmp_path)
    healthy, multi = lines["images/st/v_healthy.dicom"], lines["images/st/v_multi.dicom"]
    assert healthy["task"] == "text2image" and multi["task"] == "inpaint"
    assert healthy["prompt"] == "a mammogram in CC view with low density"
    assert healthy["density"] == "low" and healthy["vendor"] == "siemens"
    assert multi["prompt"] == "a mammogram with a lesion"
    assert len(multi["boxes"]) == 2 and multi["mask"] == f"masks/{multi['id']}.png"
    outside = {(o["file"], tuple(o["box"][:4])) for o in report["lesions_outside_crop"]}
    assert outside == {("images/st/v_multi.dicom", (5, 0, 20, 8)), ("images/st/v_outside.dicom", (10, 0, 40, 10))}
    by_file = {e["file"]: e for e in report["filtered"] + report["rejected"]}
    assert by_file["images/st/v_outside.dicom"]["kind"] == "lesions outside crop"
    assert by_file["images/st/v_hologic.dicom"]["kind"] == "vendor"
    assert by_file["images/st/v_missing.dicom"]["kind"] == "missing file"
    assert by_file["images/st/v_unboxed.dicom"]["kind"] == "lesion without box"
    assert "missing" in by_file["images/st/v_missing.dicom"]["reason"]
    assert report["counts"]["kept"] == {"text2image": 1, "inpaint": 1}


def test_mask_png_matches_metadata_boxes_and_the_hand_mapped_mark(mixed_raw, tmp_path):
    _, lines = _run("omi_h", mixed_raw / "omi", tmp_path)
    line = lines["images/demd100/1.9/1.2.dcm"]
    # 128x104 -> scale 0.5 -> 64x52, crop rows 6..58; right breast mirrored in x (52 - x).
    assert line["boxes"] == [[52 - 30, 40 / 2 - 6, 52 - 10, 100 / 2 - 6, "Mass"]]
    mask = np.asarray(Image.open(tmp_path / "inpaint" / line["mask"]))
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask, box_mask([Box(*b) for b in line["boxes"]], SIZE))
    for other in (l for l in lines.values() if l["task"] == "inpaint"):
        stored = np.asarray(Image.open(tmp_path / "inpaint" / other["mask"]))
        assert np.array_equal(stored, box_mask([Box(*b) for b in other["boxes"]], SIZE))


def test_omi_h_prompts_and_filters(mixed_raw, tmp_path):
    report, lines = _run("omi_h", mixed_raw / "omi", tmp_path)
    healthy = lines["images/demd100/1.9/1.1.dcm"]
    assert healthy["prompt"] == f"a mammogram in CC view with {healthy['area']} area"
    assert healthy["area"] == "big" and healthy["vendor"] == "hologic"
    kinds = {e["file"]: e["kind"] for e in report["filtered"]}
    assert kinds == {"images/demd100/1.9/1.3.dcm": "special protocol", "images/demd100/1.9/1.4.dcm": "vendor",
                     "images/demd100/1.9/1.5.dcm": "implant"}


def test_omi_h_in_the_release_layout_end_to_end(tmp_path):
    """Healthy Hologic images -> text2image with the OMI-H prompt, marked ones -> inpaint with a
    mask over the drawn lesion, other vendors filtered (a missing .dcm too, by its JSON header), an
    unmarked image of a client with lesions counted, a broken client JSON rejected, the rest kept."""
    raw = tmp_path / "raw"
    write_omi(raw, [dict(sop="1.1", area="big", seed=5), dict(sop="1.2", view="MLO", seed=6),
                    dict(sop="1.3", vendor="siemens", seed=7),
                    dict(sop="1.4", vendor="other", missing=True, seed=8)], client="demd100")
    phantoms = write_omi(raw, [dict(sop="2.1", laterality="R", lesions=("mass",), marks="drawn", seed=9),
                               dict(sop="2.2", seed=10)], client="optm200", study="2.9", lesion_sides={"R": 1})
    broken = raw / "data" / "demd300"
    broken.mkdir(parents=True)
    (broken / "imagedb_demd300.json").write_text('{"Site": "X", "STUDIES": ')
    out = tmp_path / "out"
    report, lines = _run("omi_h", raw, out)

    healthy = {s: l for s, l in lines.items() if l["task"] == "text2image"}
    assert set(healthy) == {"images/demd100/1.9/1.1.dcm", "images/demd100/1.9/1.2.dcm"}
    assert healthy["images/demd100/1.9/1.1.dcm"]["prompt"] == "a mammogram in CC view with big area"
    assert healthy["images/demd100/1.9/1.2.dcm"]["prompt"].startswith("a mammogram in MLO view with ")
    assert {l["vendor"] for l in lines.values()} == {"hologic"}

    lesion = lines["images/optm200/2.9/2.1.dcm"]
    assert lesion["task"] == "inpaint" and lesion["prompt"] == "a mammogram with a lesion" and lesion["flipped"]
    # the lesion's own pixels, moved by the geometry preparation used, lie under the stored mask
    spec_without = phantom_dataset(laterality="R", vendor="hologic", seed=9)[1]
    drawn = np.abs(phantoms["2.1"].image - spec_without.image) > 0.02
    geom = plan(HEIGHT, WIDTH, SIZE, flip=True)
    moved = apply_image(drawn.astype(np.float32), geom) > 0.5
    mask = np.asarray(Image.open(out / "inpaint" / lesion["mask"])) > 0
    assert moved.sum() > 5 and (moved & mask).sum() >= 0.95 * moved.sum()
    assert mask.sum() < 4 * max(moved.sum(), 1)  # a box around the lesion, not the whole breast

    filtered = {e["file"]: e for e in report["filtered"]}
    assert filtered["images/demd100/1.9/1.3.dcm"]["kind"] == "vendor"
    assert filtered["images/demd100/1.9/1.4.dcm"]["kind"] == "vendor"  # never downloaded: its header says GE
    assert filtered["images/optm200/2.9/2.2.dcm"]["kind"] == "unmarked image, client has lesions"
    assert report["counts"]["filtered"] == {"unmarked image, client has lesions": 1, "vendor": 2}
    rejected = {e["file"]: e for e in report["rejected"]}
    assert set(rejected) == {"data/demd300/imagedb_demd300.json"}
    assert "not valid JSON" in rejected["data/demd300/imagedb_demd300.json"]["reason"]
    assert report["counts"]["kept"] == {"text2image": 2, "inpaint": 1}


def test_fusion_prompts_name_the_vendor_and_filter_per_part(mixed_raw, tmp_path):
    report, lines = _run("fusion", mixed_raw, tmp_path)
    assert lines["vindr/images/st/v_healthy.dicom"]["prompt"] == \
        "a siemens mammogram in CC view with low density and medium area"
    assert lines["omi/images/demd100/1.9/1.1.dcm"]["prompt"] == "a hologic mammogram in CC view with big area"
    vendor_drops = {e["file"] for e in report["filtered"] if e["kind"] == "vendor"}
    assert vendor_drops == {"vindr/images/st/v_hologic.dicom", "omi/images/demd100/1.9/1.4.dcm"}
    attributes = json.loads((tmp_path / "attributes.json").read_text())
    assert attributes["vendors"] == ["hologic", "siemens"]
    assert attributes["tasks"]["text2image"]["densities"] == ["low"]
    assert attributes["templates"]["text2image"].startswith("a {vendor} mammogram")


def test_no_phi_in_any_output(folder_run, mixed_raw, tmp_path, capfd):
    out, _ = folder_run
    _run("fusion", mixed_raw, tmp_path)
    captured = capfd.readouterr()
    texts = [captured.out, captured.err] + [p.read_bytes().decode("latin-1")
                                            for d in (out, tmp_path) for p in d.rglob("*") if p.is_file()]
    for value in PHI.values():
        assert not any(value in text for text in texts), value


# --- the synthetic set: end to end, resume, re-run, workers -------------------------------------

SYNTH = ("dataset.source.n=24", "dataset.source.height=128", "dataset.source.width=104",
         "dataset.source.progress=false")


@pytest.fixture(scope="module")
def synthetic_raw(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic") / "raw"


@pytest.fixture(scope="module")
def clean_run(synthetic_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_clean")
    report = prepare_dataset(compose_prepare("synthetic", synthetic_raw, out, *SYNTH))
    return out, report, snapshot(out)


def test_synthetic_attributes_match_the_drawn_phantoms(clean_run):
    out, report, _ = clean_run
    plans = {p.image_id: p for p in plan_set(24, 0)}
    lines = [line for task in ("text2image", "inpaint") for line in read_lines(out, task)]
    assert len(lines) == report["kept"] >= 12
    for line in lines:
        plan = plans[line["id"]]
        assert (line["view"], line["laterality"], line["area"]) == (plan.view, plan.laterality, plan.area)
        assert line["flipped"] == (plan.laterality == "R")
        expected = "a mammogram with a lesion" if "boxes" in line else \
            f"a mammogram in {plan.view} view with {plan.area} area"
        assert line["prompt"] == expected
        assert ("boxes" in line) == bool(plan.lesions)
        assert line["density"] == ({"A": "very low", "B": "low", "C": "high", "D": "very high"}[plan.density]
                                   if plan.layout == "vindr" else None)
    assert report["rejected"] == [] and report["orientation_disagreements"] == []
    dropped = {e["id"] for e in report["filtered"]}
    assert dropped == {p.image_id for p in plans.values()
                       if p.implant or p.special_protocol or p.view == "XCCL"}


def test_rerun_is_a_noop(clean_run, synthetic_raw):
    out, report, before = clean_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = prepare_dataset(compose_prepare("synthetic", synthetic_raw, out, *SYNTH))
    assert again["run"]["processed"] == 0 and again["run"]["reused"] == report["counts"]["in"]
    assert snapshot(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps


def test_two_workers_give_the_same_outputs(clean_run, synthetic_raw, tmp_path):
    report = prepare_dataset(compose_prepare("synthetic", synthetic_raw, tmp_path, *SYNTH,
                                             "preparation.num_workers=2", "preparation.chunk_size=2"))
    assert report["run"]["num_workers"] == 2 and report["run"]["processed"] == report["counts"]["in"]
    assert snapshot(tmp_path) == clean_run[2]


KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import mame_lightning.data.prepare.item as item
from mame_lightning.data.prepare.preparation import prepare_dataset
from helpers.preparation import compose_prepare
write_png, written = item.write_png, []
def write_then_die(path, image):
    write_png(path, image)
    written.append(path)
    if len(written) == {after}:  # killed between an image and its sidecar
        os.kill(os.getpid(), signal.SIGKILL)
item.write_png = write_then_die
prepare_dataset(compose_prepare("synthetic", {raw!r}, {out!r}, *{overrides!r}))
"""


def test_resume_after_sigkill_matches_a_clean_run(clean_run, synthetic_raw, tmp_path):
    script = KILLER.format(tests=str(Path(__file__).parent), after=7, raw=str(synthetic_raw),
                           out=str(tmp_path), overrides=SYNTH)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "report.json").exists()
    sidecars = list((tmp_path / ".items").glob("*.json"))
    assert 0 < len(sidecars) < clean_run[1]["counts"]["in"]

    report = prepare_dataset(compose_prepare("synthetic", synthetic_raw, tmp_path, *SYNTH))
    assert 0 < report["run"]["reused"] < report["counts"]["in"]
    assert snapshot(tmp_path) == clean_run[2]


def test_resume_after_lost_outputs_and_stale_files(clean_run, synthetic_raw, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_run[0], out)
    touched = set()
    for path in sorted((out / ".items").glob("*.json"))[:3]:  # sidecars lost
        path.unlink()
        touched.add(path.stem)
    for pattern in ("text2image/images/*.png", "inpaint/masks/*.png"):  # an image and a mask lost
        path = next(p for p in sorted(out.glob(pattern)) if p.stem not in touched)
        path.unlink()
        touched.add(path.stem)
    (out / "text2image/images/stale.png").write_bytes(b"old")
    (out / "inpaint/metadata.jsonl").write_text("")
    (out / "text2image/images/.x.png.123.tmp").write_bytes(b"half")
    report = prepare_dataset(compose_prepare("synthetic", synthetic_raw, out, *SYNTH))
    assert report["run"]["processed"] == len(touched) == 5
    assert snapshot(out) == clean_run[2]


def test_no_phi_from_the_synthetic_dicoms(clean_run, synthetic_raw, tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    prepare_dataset(compose_prepare("synthetic", synthetic_raw, tmp_path, *SYNTH))
    phi = {value for plan in plan_set(24, 0) for value in phi_of(plan.patient).values()}
    raw_bytes = b"".join(p.read_bytes() for p in synthetic_raw.rglob("*") if p.suffix in (".dcm", ".dicom"))
    assert all(value.encode() in raw_bytes for value in phi)  # the input does carry them
    captured = capfd.readouterr()
    texts = [captured.out, captured.err, caplog.text]
    texts += [p.read_bytes().decode("latin-1") for d in (tmp_path, clean_run[0]) for p in d.rglob("*") if p.is_file()]
    leaks = [value for value in phi if any(value in text for text in texts)]
    assert leaks == []
