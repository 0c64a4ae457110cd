"""The synthetic raw set: both layouts, every acquisition variant, determinism, PHI, re-runs, CLI."""

import ast
import csv
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from mame_lightning.data import geometry, tissue
from mame_lightning.data.dicom import normalise_vendor, read_dicom, tag_metadata, to_float_image, to_uint8
from mame_lightning.data.prepare.filters import special_protocol
from mame_lightning.data.prepare.sources.omi import OmiSource
from mame_lightning.data.prepare.sources.vindr import VinDrSource
from mame_lightning.data.synthetic.plan import plan_set, spread
from mame_lightning.data.synthetic.phantom_set import write_synthetic_set
from helpers.omi_layout import omidb_view

N, H, W = 24, 128, 104
HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The same 24-image set written twice into different folders."""
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    summary = write_synthetic_set(first, N, height=H, width=W, seed=3, progress=False)
    again = write_synthetic_set(second, N, height=H, width=W, seed=3, progress=False)
    return first, second, summary, again


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def dicom_files(root):
    return sorted(root.glob("vindr/images/*/*.dicom")) + sorted(root.glob("omi/images/*/*/*.dcm"))


def test_vindr_layout_has_the_release_files_and_columns(made):
    root, _, summary, _ = made
    breast = read_rows(root / "vindr/breast-level_annotations.csv")
    findings = read_rows(root / "vindr/finding_annotations.csv")
    metadata = read_rows(root / "vindr/metadata.csv")
    assert list(breast[0]) == ["study_id", "series_id", "image_id", "laterality", "view_position",
                               "height", "width", "breast_birads", "breast_density", "split"]
    assert set(breast[0]) | {"finding_categories", "finding_birads", "xmin", "ymin", "xmax",
                             "ymax"} == set(findings[0])
    assert {"SOP Instance UID", "Series Instance UID", "Manufacturer", "Manufacturer's Model Name",
            "Rows", "Columns", "Photometric Interpretation"} <= set(metadata[0])
    assert not [c for c in metadata[0] if "Patient" in c]
    assert len(breast) == len(metadata) == summary["counts"]["layout"]["vindr"]
    for row in breast:
        assert HEX32.match(row["study_id"]) and HEX32.match(row["image_id"])
        assert (root / "vindr/images" / row["study_id"] / f"{row['image_id']}.dicom").is_file()
        assert row["breast_density"] in {f"DENSITY {d}" for d in "ABCD"}
        assert re.fullmatch(r"BI-RADS [1-5]", row["breast_birads"])
        assert row["split"] in {"training", "test"} and (int(row["height"]), int(row["width"])) == (H, W)
    assert {row["view_position"] for row in breast} == {"CC", "MLO", "XCCL"}
    assert len({row["study_id"] for row in breast}) < len(breast)  # studies hold several images
    for row in findings:
        categories = ast.literal_eval(row["finding_categories"])
        if categories == ["No Finding"]:
            assert row["xmin"] == row["finding_birads"] == ""
        else:
            assert set(categories) <= {"Mass", "Suspicious Calcification"}
            assert 0 <= float(row["xmin"]) < float(row["xmax"]) <= W
            assert 0 <= float(row["ymin"]) < float(row["ymax"]) <= H
    finding_images = {row["image_id"] for row in findings}
    assert finding_images == {row["image_id"] for row in breast}  # healthy ones have No Finding
    assert ["Mass", "Suspicious Calcification"] in [ast.literal_eval(r["finding_categories"]) for r in findings]


def test_omi_layout_is_the_release_layout_as_omidb_reads_it(made):
    root, _, summary, _ = made
    omi = root / "omi"
    plans = [p for p in plan_set(N, seed=3) if p.layout == "omi"]
    clients = {p.group for p in plans}
    assert {p.name for p in (omi / "data").iterdir()} == clients and all(c.startswith("demd") for c in clients)
    for client in clients:
        imagedb = json.loads((omi / "data" / client / f"imagedb_{client}.json").read_text())
        assert set(imagedb) == {"Site", "STUDIES"}
        for study in imagedb["STUDIES"].values():
            assert {"StudyDate", "EpisodeID"} <= set(study)
        nbss = json.loads((omi / "data" / client / f"nbss_{client}.json").read_text())
        has_lesion = any(p.lesions for p in plans if p.group == client)
        assert ("LESION" in nbss["1"]) == has_lesion
    for plan in plans:  # every image: its .dcm and its JSON header (two spellings, as in the release)
        assert (omi / "images" / plan.group / plan.study_uid / f"{plan.sop_uid}.dcm").is_file()
        headers = [omi / "data" / plan.group / plan.study_uid / f"{plan.sop_uid}{s}" for s in (".json", ".dcm.json")]
        header = json.loads(next(h for h in headers if h.is_file()).read_text())
        assert header["00080070"]["Value"][0] == plan.manufacturer  # Manufacturer, DICOM JSON model
        assert "7FE00010" not in header and "00100010" not in header  # no pixels, no patient name
    assert any((omi / "data").rglob("*.dcm.json")) and any((omi / "data").rglob("2.25.*[0-9].json"))

    judge = omidb_view(omi)  # the omidb package reads every client, image and mark
    assert set(judge) == clients
    assert sum(len(images) for images in judge.values()) == summary["counts"]["layout"]["omi"]
    for plan in plans:
        assert bool(judge[plan.group][plan.sop_uid]) == bool(plan.lesions)
        for x1, y1, x2, y2 in judge[plan.group][plan.sop_uid]:
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H

    records = [r for r in OmiSource().records(omi)]
    assert len(records) == len(plans) and all(r.source.endswith(".dcm") for r in records)
    specials = [p for p in plans if p.special_protocol]
    assert specials  # written as a magnification series, read from the header
    for plan in specials:
        ds = pydicom.dcmread(omi / "images" / plan.group / plan.study_uid / f"{plan.sop_uid}.dcm",
                             stop_before_pixels=True)
        assert special_protocol(ds)


def test_every_dicom_reads_back_and_every_variant_is_present(made):
    root, _, summary, _ = made
    files = dicom_files(root)
    assert len(files) == N
    seen = Counter()
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "MG" and ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.pixel_array.shape == (H, W)
        assert 0.07 * 3328 / H - 1e-6 <= float(ds.PixelSpacing[0]) <= 0.1 * 3328 / H + 1e-6
        assert path.stem == ds.SOPInstanceUID or path.suffix == ".dicom"
        seen["syntax", ds.file_meta.TransferSyntaxUID] += 1
        seen["photometric", ds.PhotometricInterpretation] += 1
        seen["bits", int(ds.BitsStored)] += 1
        seen["voi", ds.get("VOILUTFunction", "none")] += 1
        seen["view code", "ViewCodeSequence" in ds and not ds.ViewPosition] += 1
        seen["series laterality", "Laterality" in ds and "ImageLaterality" not in ds] += 1
        seen["implant", ds.BreastImplantPresent] += 1
        meta = tag_metadata(read_dicom(path))
        assert meta["view"] in {"CC", "MLO", "XCCL"} and meta["laterality"] in {"L", "R"}
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless):
        assert seen["syntax", syntax], syntax
    for key in [("photometric", "MONOCHROME1"), ("photometric", "MONOCHROME2"), ("bits", 12),
                ("bits", 16), ("voi", "SIGMOID"), ("voi", "LINEAR"), ("voi", "none"),
                ("view code", True), ("series laterality", True), ("implant", "YES")]:
        assert seen[key], key
    assert seen["syntax", RLELossless] == summary["counts"]["compression"]["rle"]


def test_vendors_follow_the_layouts(made):
    root, *_ = made
    vendors = {"vindr": Counter(), "omi": Counter()}
    for path in dicom_files(root):
        part = path.relative_to(root).parts[0]
        vendors[part][normalise_vendor(pydicom.dcmread(path, stop_before_pixels=True).Manufacturer)] += 1
    assert vendors["vindr"].most_common(1)[0][0] == "siemens" and vendors["vindr"]["other"] >= 1
    assert vendors["omi"].most_common(1)[0][0] == "hologic" and vendors["omi"]["other"] >= 1
    raw = {pydicom.dcmread(p, stop_before_pixels=True).Manufacturer for p in dicom_files(root)}
    assert len({m for m in raw if normalise_vendor(m) == "siemens"}) >= 2  # spelling variants


def test_prepared_area_classes_and_boxes_match_the_annotations(made):
    """Decode each file as preparation will, and check its area class and lesion brightness."""
    root, *_ = made
    plans = {plan.sop_uid: plan for plan in plan_set(N, seed=3)}
    records = [("vindr", r) for r in VinDrSource().records(root / "vindr")]
    records += [("omi", r) for r in OmiSource().records(root / "omi")]
    assert len(records) == N
    measured = Counter()
    for part, record in records:
        ds = read_dicom(root / part / record.source)
        plan = plans[ds.SOPInstanceUID]
        image = to_float_image(ds)
        prepared = geometry.apply_image(image, geometry.plan(H, W, 64))
        area = tissue.area_class(tissue.area_ratio(tissue.tissue_mask(to_uint8(prepared))))
        if not plan.implant:  # a bright implant moves the Otsu threshold; filtered out anyway
            assert area == plan.area, (record.source, plan)
            measured[area] += 1
        assert bool(record.boxes) == bool(plan.lesions)
        for box in record.boxes:
            patch = image[int(box.y0):int(np.ceil(box.y1)), int(box.x0):int(np.ceil(box.x1))]
            assert patch.max() > np.percentile(image[tissue.tissue_mask(to_uint8(image))], 90)
    assert set(measured) == {"small", "medium", "big"} and max(measured.values()) - min(measured.values()) <= 3


def test_same_seed_gives_identical_files(made):
    first, second, summary, again = made
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert summary["phi_strings"] == again["phi_strings"]


def test_other_seed_gives_other_pixels_and_ids(made, tmp_path):
    first, *_ = made
    other = write_synthetic_set(tmp_path, 4, height=H, width=W, seed=4, progress=False)
    assert other["n"] == 4
    ids = {p.stem for p in dicom_files(first)}
    assert not ids & {p.stem for p in dicom_files(tmp_path)}


def test_fake_patient_identifiers_are_inside_the_dicoms_only(made):
    root, _, summary, _ = made
    phi = summary["phi_strings"]
    assert any(s.startswith("SYNTH^PATIENT^") for s in phi) and any(s.startswith("PID-SYN-") for s in phi)
    for path in dicom_files(root):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for value in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber):
            assert value in phi
            assert value.encode() in path.read_bytes()
    annotation_text = "".join(p.read_text() for p in root.rglob("*") if p.suffix in {".csv", ".json"})
    assert not [s for s in phi if s in annotation_text]


def test_manifest_counts_what_was_written(made):
    root, _, summary, _ = made
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"] == summary["counts"]
    counts = manifest["counts"]
    assert sum(counts["area"].values()) == N and set(counts["density"]) == set("ABCD")
    assert abs(counts["lesions"]["with"] - 0.3 * N) <= 2
    assert set(counts["lesion_kinds"]) == {"mass", "calcification", "calcified_mass"}
    assert set(manifest["images"]) == {p.relative_to(root).as_posix() for p in dicom_files(root)}


def test_rerun_reuses_files_and_a_smaller_set_removes_the_rest(tmp_path):
    first = write_synthetic_set(tmp_path, 6, height=H, width=W, seed=1, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in dicom_files(tmp_path)}
    again = write_synthetic_set(tmp_path, 6, height=H, width=W, seed=1, progress=False)
    assert (first["written"], again["written"], again["reused"]) == (6, 0, 6)
    assert stamps == {p: p.stat().st_mtime_ns for p in dicom_files(tmp_path)}

    victim = dicom_files(tmp_path)[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a damaged file is redrawn
    assert write_synthetic_set(tmp_path, 6, height=H, width=W, seed=1, progress=False)["written"] == 1
    pydicom.dcmread(victim).pixel_array

    smaller = write_synthetic_set(tmp_path, 2, height=H, width=W, seed=1, progress=False)
    assert len(dicom_files(tmp_path)) == 2 and smaller["removed"] > 0
    assert len(list((tmp_path / "omi/data").glob("*/imagedb_*.json"))) == 1
    assert len(list((tmp_path / "omi/data").glob("*/*/*.json"))) == 1  # one header per image left
    assert not [d for d in tmp_path.rglob("*") if d.is_dir() and not any(d.iterdir())]


@pytest.mark.parametrize("n", [4, 8, 24, 100])
def test_spread_keeps_proportions_and_covers_every_value(n):
    weights = {"a": 0.7, "b": 0.2, "c": 0.1, "never": 0.0}
    values = spread(n, weights, np.random.default_rng(0))
    counts = Counter(values)
    assert len(values) == n and "never" not in counts
    assert set(counts) == {"a", "b", "c"}
    for key in ("a", "b", "c"):
        assert abs(counts[key] - weights[key] * n) <= 1.5


def test_plan_refuses_bad_arguments():
    with pytest.raises(ValueError, match="n=0"):
        plan_set(0)
    with pytest.raises(ValueError, match="lesion_fraction"):
        plan_set(4, lesion_fraction=1.5)


def test_without_calcifications_every_lesion_is_a_mass():
    plans = plan_set(40, lesion_fraction=0.5, calcifications=False)
    assert {p.lesions for p in plans} == {(), ("mass",)}
    assert sum(bool(p.lesions) for p in plans) == 20


def test_cli_writes_a_set_and_nothing_else(tmp_path):
    out = tmp_path / "set"
    result = subprocess.run([sys.executable, "-m", "mame_lightning.synth", f"out={out}", "n=8",
                             "preset=tests", "progress=false"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no outputs/, .hydra/ or log
    assert len(dicom_files(out)) == 8
    assert len(read_rows(out / "vindr/breast-level_annotations.csv")) == 4
    assert pydicom.dcmread(dicom_files(out)[0]).pixel_array.shape == (128, 104)
    assert "written" in result.stdout and "area" in result.stdout


def test_cli_explicit_size_overrides_the_preset(tmp_path):
    from omegaconf import OmegaConf

    from mame_lightning.runs.synthetic_set import image_size

    cfg = OmegaConf.create({"preset": "full", "presets": {"full": [3328, 2560]},
                            "height": None, "width": None})
    assert image_size(cfg) == (3328, 2560)
    cfg.height, cfg.width = 96, 80
    assert image_size(cfg) == (96, 80)
    cfg.width = None
    with pytest.raises(ValueError, match="both"):
        image_size(cfg)
    cfg.height, cfg.preset = None, "huge"
    with pytest.raises(ValueError, match="huge"):
        image_size(cfg)
