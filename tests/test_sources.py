"""Metadata sources: VinDr CSVs, OMI-DB in its release layout, DICOM folder walks, combined sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import mame_lightning
from mame_lightning.data.records import Box, ImageRecord, Rejection
from mame_lightning.data.prepare.sources import CombinedSource, SourceError, parse_flag
from mame_lightning.data.prepare.sources.folder import FolderSource, has_dicom_marker, path_id
from mame_lightning.data.prepare.sources.omi import NOT_HEALTHY_KIND, OmiSource
from mame_lightning.data.prepare.sources.synthetic import MARKER, SyntheticSource, ensure_raw_set
from mame_lightning.data.prepare.sources.vindr import VinDrSource, parse_categories, parse_density
from helpers.omi_layout import mark, omidb_view, write_client, write_header

CONF = Path(mame_lightning.__file__).parent / "conf"
BREAST_COLUMNS = ["study_id", "series_id", "image_id", "laterality", "view_position", "height",
                  "width", "breast_birads", "breast_density", "split"]
FINDING_COLUMNS = ["study_id", "series_id", "image_id", "laterality", "view_position", "height",
                   "width", "breast_birads", "breast_density", "finding_categories", "finding_birads",
                   "xmin", "ymin", "xmax", "ymax", "split"]


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def image_row(study, image, lat="L", view="CC", density="DENSITY B", split="training"):
    return {"study_id": study, "series_id": "s", "image_id": image, "laterality": lat,
            "view_position": view, "height": 3518, "width": 2800, "breast_birads": "BI-RADS 1",
            "breast_density": density, "split": split}


def finding_row(study, image, categories, box=None, **kwargs):
    row = image_row(study, image, **kwargs)
    row["finding_categories"] = categories
    if box:
        row.update(dict(zip(("xmin", "ymin", "xmax", "ymax"), box)))
    return row


@pytest.fixture
def vindr_dir(tmp_path):
    root = tmp_path / "vindr_raw"
    root.mkdir()
    images = [image_row("st1", "healthy", density="DENSITY A"),
              image_row("st1", "multi", lat="R", view="MLO", density="DENSITY D", split="test"),
              image_row("st2", "unboxed", view="MLO", density="DENSITY C")]
    findings = [finding_row("st1", "healthy", "['No Finding']", density="DENSITY A"),
                finding_row("st1", "multi", "['Mass', 'Suspicious Calcification']", (10, 20, 50, 60),
                            lat="R", view="MLO", density="DENSITY D", split="test"),
                finding_row("st1", "multi", "['Focal Asymmetry']", (300.5, 100, 200.5, 180),
                            lat="R", view="MLO", density="DENSITY D", split="test"),
                finding_row("st2", "unboxed", "['Mass']", view="MLO", density="DENSITY C")]
    write_csv(root / "breast-level_annotations.csv", BREAST_COLUMNS, images)
    write_csv(root / "finding_annotations.csv", FINDING_COLUMNS, findings)
    return root


def test_vindr_records_healthy_multi_finding_and_unboxed(vindr_dir):
    records = {r.image_id: r for r in VinDrSource().records(vindr_dir)}
    assert set(records) == {"healthy", "multi", "unboxed"}

    healthy = records["healthy"]
    assert healthy.source == "images/st1/healthy.dicom"
    assert healthy.boxes == [] and "unlocalised_findings" not in healthy.extra
    assert (healthy.view, healthy.laterality, healthy.density, healthy.split) == ("CC", "L", "A", "training")
    assert healthy.manufacturer is None  # vendor comes from the DICOM tag

    multi = records["multi"]
    assert multi.boxes == [Box(10, 20, 50, 60, "Mass, Suspicious Calcification"),
                           Box(200.5, 100, 300.5, 180, "Focal Asymmetry")]  # corners ordered
    assert (multi.laterality, multi.view, multi.density, multi.split) == ("R", "MLO", "D", "test")

    assert records["unboxed"].boxes == []
    assert records["unboxed"].extra["unlocalised_findings"] == ["Mass"]


def test_vindr_split_selection(vindr_dir):
    ids = [r.image_id for r in VinDrSource(splits=["test"]).records(vindr_dir)]
    assert ids == ["multi"]


@pytest.mark.parametrize("missing", ["breast-level_annotations.csv", "finding_annotations.csv"])
def test_vindr_missing_csv_names_the_file(vindr_dir, missing):
    (vindr_dir / missing).unlink()
    with pytest.raises(SourceError, match=missing):
        list(VinDrSource().records(vindr_dir))


def test_vindr_category_and_density_parsing():
    assert parse_categories("['Mass', 'Suspicious Calcification']", "x") == ["Mass", "Suspicious Calcification"]
    assert parse_categories("Mass", "x") == ["Mass"] and parse_categories("", "x") == []
    assert parse_density("DENSITY C") == "C" and parse_density("b") == "B"
    assert parse_density("") is None and parse_density("DENSITY E") is None


def test_vindr_bad_row_rejects_its_image_and_the_rest_goes_on(vindr_dir):
    rows = [finding_row("st1", "healthy", "['No Finding']"), finding_row("st1", "multi", "['Mass'"),
            finding_row("st2", "unboxed", "['Mass']")]
    write_csv(vindr_dir / "finding_annotations.csv", FINDING_COLUMNS, rows)
    items = list(VinDrSource().records(vindr_dir))
    rejected = [i for i in items if isinstance(i, Rejection)]
    assert [r.image_id for r in rejected] == ["multi"]
    assert rejected[0].file == "finding_annotations.csv" and "line 3" in rejected[0].reason
    assert {i.image_id for i in items if isinstance(i, ImageRecord)} == {"healthy", "unboxed"}


# --- OMI-DB in the release layout ------------------------------------------------------------


def omi_tree(root: Path) -> Path:
    """Two clients as the release lays them out, plus a folder that is not a client."""
    write_client(root, "demd1", {"1.2.3": {
        "1.2.3.1": [mark(7, 40, 90, 10, 30, "Mass"), mark(8, 5, 5, 8, 9, "SuspiciousCalcifications",
                                                         "ArchitecturalDistortion")],
        "1.2.3.2": []}}, lesion_sides={"R": 1})
    write_client(root, "optm2", {"2.5": {"2.5.1": [], "2.5.2": []}})
    (root / "data" / "notes").mkdir()
    (root / "data" / "notes" / "readme.json").write_text("{}")
    return root


def test_omi_records_follow_the_release_layout_as_omidb_reads_it(tmp_path):
    root = omi_tree(tmp_path)
    items = list(OmiSource().records(root))
    assert all(isinstance(i, ImageRecord) for i in items)
    records = {r.image_id: r for r in items}
    marked = records["1.2.3.1"]
    assert marked.source == "images/demd1/1.2.3/1.2.3.1.dcm"
    assert marked.boxes == [Box(10, 30, 40, 90, "Mass"),
                            Box(5, 5, 8, 9, "Suspicious Calcification, Architectural Distortion")]
    # attributes are the DICOM header's: the .dcm's during preparation, its JSON header until it is there
    assert (marked.view, marked.laterality, marked.manufacturer, marked.implant) == (None, None, None, None)
    assert marked.extra["header"]["manufacturer"] == "HOLOGIC, Inc."
    # an unmarked image of a client with an NBSS lesion is neither healthy nor a lesion image
    assert records["1.2.3.2"].extra["unlocalised_kind"] == NOT_HEALTHY_KIND
    assert "1 lesion" in records["1.2.3.2"].extra["unlocalised_findings"][0]
    assert "unlocalised_findings" not in records["2.5.1"].extra and records["2.5.1"].boxes == []

    judge = omidb_view(root)  # the omidb package reads the same clients, images and marks
    assert set(judge) == {"demd1", "optm2"}
    ours = {(r.source.split("/")[1], r.image_id): sorted((b.x0, b.y0, b.x1, b.y1) for b in r.boxes)
            for r in records.values()}
    theirs = {(client, image): sorted((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
                                      for x1, y1, x2, y2 in boxes)
              for client, images in judge.items() for image, boxes in images.items()}
    assert ours == theirs


def test_omi_unmarked_images_are_healthy_whatever_nbss_says_when_asked(tmp_path):
    root = omi_tree(tmp_path)
    (root / "data" / "demd1" / "nbss_demd1.json").unlink()  # not needed under this rule
    records = {r.image_id: r for r in OmiSource(healthy="unmarked").records(root)}
    assert "unlocalised_findings" not in records["1.2.3.2"].extra
    with pytest.raises(ValueError, match="healthy"):
        OmiSource(healthy="normal")


def test_omi_bad_client_files_are_rejections_and_the_rest_goes_on(tmp_path):
    root = omi_tree(tmp_path)
    (root / "data" / "demd3").mkdir()
    (root / "data" / "demd3" / "imagedb_demd3.json").write_text("{not json")
    write_client(root, "demd4", {})
    (root / "data" / "demd4" / "imagedb_demd4.json").write_text(json.dumps({"Site": "X", "studies": {}}))
    write_client(root, "demd5", {"5.1": {"5.1.1": [{"MarkID": 1, "X1": "3", "Y1": "4"}], "5.1.2": []}})
    write_client(root, "demd6", {"6.1": {"6.1.1": []}})
    (root / "data" / "demd6" / "nbss_demd6.json").unlink()
    (root / "data" / "demd7").mkdir()  # a client folder without any JSON
    items = list(OmiSource().records(root))
    rejected = {r.file: r for r in items if isinstance(r, Rejection)}
    assert set(rejected) == {"data/demd3/imagedb_demd3.json", "data/demd4/imagedb_demd4.json",
                             "data/demd5/imagedb_demd5.json", "data/demd6/nbss_demd6.json",
                             "data/demd7/imagedb_demd7.json"}
    assert "not valid JSON" in rejected["data/demd3/imagedb_demd3.json"].reason
    assert "STUDIES" in rejected["data/demd4/imagedb_demd4.json"].reason
    bad_mark = rejected["data/demd5/imagedb_demd5.json"]
    assert bad_mark.image_id == "5.1.1" and "mark 1" in bad_mark.reason and "X2" in bad_mark.reason
    assert "not found" in rejected["data/demd7/imagedb_demd7.json"].reason
    kept = {r.image_id for r in items if isinstance(r, ImageRecord)}
    assert kept == {"1.2.3.1", "1.2.3.2", "2.5.1", "2.5.2", "5.1.2"}  # the good image of demd5 too

    with pytest.raises(SourceError, match="data"):
        list(OmiSource().records(tmp_path / "elsewhere"))


def test_omi_header_json_stands_in_for_a_dcm_not_there_yet(tmp_path):
    from helpers.preparation import phantom_dataset

    write_client(tmp_path, "demd9", {"9.1": {"9.1.1": [], "9.1.2": []}}, upper=True, headers=False)
    ge, _ = phantom_dataset(vendor="other", view="MLO", laterality="R",
                            extra={"SeriesDescription": "R MLO MAGNIFICATION"})
    write_header(tmp_path, "demd9", "9.1", "9.1.1", ge, suffix=".dcm.json")
    records = {r.image_id: r for r in OmiSource().records(tmp_path)}  # IMAGEDB_/NBSS_ spellings
    header = records["9.1.1"].extra["header"]
    assert header["manufacturer"] == "GE MEDICAL SYSTEMS" and header["view"] == "MLO"
    assert header["laterality"] == "R" and header["modality"] == "MG"
    assert header["special_protocol"] == "R MLO MAGNIFICATION"
    assert "header" not in records["9.1.2"].extra  # neither a .dcm nor a header: rejected later


def test_parse_flag():
    assert [parse_flag(v) for v in (None, True, "YES", "no", "", 0, "Stereotactic")] == \
        [None, True, True, False, False, False, True]


def _dicom_bytes(body=b"payload"):
    return b"\0" * 128 + b"DICM" + body


def test_folder_walks_nested_tree_with_odd_extensions(tmp_path):
    files = {"a/b/IMG0001": _dicom_bytes(), "a/scan.IMA": _dicom_bytes(), "c/x.DCM": b"not dicom",
             "c/y.dicom": _dicom_bytes(), "notes.txt": b"hello", "a/.hidden.dcm": _dicom_bytes(),
             "d/e/f/deep.bin": _dicom_bytes()}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    records = list(FolderSource(id_salt="s").records(tmp_path))
    sources = [r.source for r in records]
    # Marker-bearing files whatever their name, DICOM-named files even without the marker.
    assert sources == ["a/scan.IMA", "a/b/IMG0001", "c/x.DCM", "c/y.dicom", "d/e/f/deep.bin"]
    assert all(r.view is None and r.laterality is None and r.manufacturer is None for r in records)
    ids = [r.image_id for r in records]
    assert len(set(ids)) == len(ids) and ids[0] == path_id("a/scan.IMA", "s")
    assert all("scan" not in i and "IMG" not in i for i in ids)
    assert path_id("a/scan.IMA", "other") != ids[0]  # the salt changes every id
    assert has_dicom_marker(tmp_path / "a/b/IMG0001") and not has_dicom_marker(tmp_path / "notes.txt")


def test_folder_missing_dir(tmp_path):
    with pytest.raises(SourceError, match="absent"):
        list(FolderSource().records(tmp_path / "absent"))


def test_combined_source_prefixes_parts_from_config(tmp_path, vindr_dir):
    write_client(tmp_path / "omi", "demd1", {"1.2.3": {"9.9": []}})
    (tmp_path / "vindr").symlink_to(vindr_dir)
    cfg = OmegaConf.load(CONF / "dataset" / "fusion.yaml").source
    source = instantiate(cfg)
    assert isinstance(source, CombinedSource)
    sources = sorted(r.source for r in source.records(tmp_path))
    assert sources == ["omi/images/demd1/1.2.3/9.9.dcm", "vindr/images/st1/healthy.dicom",
                       "vindr/images/st1/multi.dicom", "vindr/images/st2/unboxed.dicom"]


def test_combined_source_goes_on_when_one_part_cannot_be_read(tmp_path, vindr_dir):
    (tmp_path / "vindr").symlink_to(vindr_dir)
    source = CombinedSource({"omi": OmiSource(), "vindr": VinDrSource()})
    items = list(source.records(tmp_path))  # no omi/ folder at all
    rejected = [i for i in items if isinstance(i, Rejection)]
    assert len(rejected) == 1 and rejected[0].file == "omi/data" and "not found" in rejected[0].reason
    assert len([i for i in items if isinstance(i, ImageRecord)]) == 3
    with pytest.raises(SourceError, match="no part could be read"):
        list(CombinedSource({"omi": OmiSource()}).records(tmp_path / "empty"))


def test_synthetic_source_writes_once_reuses_and_never_overwrites_foreign_folders(tmp_path):
    raw = tmp_path / "raw"
    source = SyntheticSource(n=4, height=40, width=32, seed=1, progress=False)
    records = list(source.records(raw))
    assert len(records) == 4 and {r.source.split("/")[0] for r in records} == {"vindr", "omi"}
    assert all((raw / r.source).is_file() for r in records)
    marker = (raw / MARKER).stat().st_mtime_ns
    assert ensure_raw_set(raw, source.settings) is False and (raw / MARKER).stat().st_mtime_ns == marker

    other = SyntheticSource(n=2, height=40, width=32, seed=1, progress=False)
    assert len(list(other.records(raw))) == 2  # new settings: regenerated in place
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no staging folder left behind

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.dcm").write_bytes(b"x")
    with pytest.raises(SourceError, match="refusing"):
        list(source.records(foreign))
    assert (foreign / "precious.dcm").read_bytes() == b"x"
