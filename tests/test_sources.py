"""Metadata sources: VinDr CSVs, OMI-DB client JSON, DICOM folder walks, combined sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import mame_lightning
from mame_lightning.data.records import Box
from mame_lightning.data.sources import CombinedSource, SourceError, parse_flag
from mame_lightning.data.sources.folder import FolderSource, has_dicom_marker, path_id
from mame_lightning.data.sources.omi import OmiSource
from mame_lightning.data.sources.synthetic import MARKER, SyntheticSource, ensure_raw_set
from mame_lightning.data.sources.vindr import VinDrSource, parse_categories, parse_density

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


def test_vindr_bad_category_list_names_file_and_line(vindr_dir):
    rows = [finding_row("st1", "healthy", "['Mass'")]
    write_csv(vindr_dir / "finding_annotations.csv", FINDING_COLUMNS, rows)
    with pytest.raises(SourceError, match=r"finding_annotations.csv line 2"):
        list(VinDrSource().records(vindr_dir))


def test_vindr_category_and_density_parsing():
    assert parse_categories("['Mass', 'Suspicious Calcification']", "x") == ["Mass", "Suspicious Calcification"]
    assert parse_categories("Mass", "x") == ["Mass"] and parse_categories("", "x") == []
    assert parse_density("DENSITY C") == "C" and parse_density("b") == "B"
    assert parse_density("") is None and parse_density("DENSITY E") is None


def omi_client(client="demd1", status="M", images=None):
    return {"ClientID": client, "Status": status, "Studies": {"1.2.3": {"Images": images or {}}}}


def omi_image(view="CC", lat="L", manufacturer="HOLOGIC, Inc.", implant="NO", special=False,
              marks=(), file=None):
    image = {"ViewPosition": view, "ImageLaterality": lat, "Manufacturer": manufacturer,
             "BreastImplantPresent": implant, "SpecialProtocol": special,
             "Marks": [dict(zip(("X1", "Y1", "X2", "Y2", "LesionType"), m)) for m in marks]}
    if file:
        image["File"] = file
    return image


def write_client(root, client):
    path = root / "data" / client["ClientID"] / f"{client['ClientID']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(client))


def test_omi_records(tmp_path):
    write_client(tmp_path, omi_client("demd1", "M", {
        "1.1": omi_image(marks=[(40, 90, 10, 30, "mass"), (5, 5, 8, 9, "calcification")]),
        "1.2": omi_image(view="MLO", lat="r", implant="YES", special="Stereotactic"),
    }))
    write_client(tmp_path, omi_client("demd2", "N", {
        "2.1": omi_image(manufacturer="SIEMENS", file="images/elsewhere/2.1.dcm")}))
    records = {r.image_id: r for r in OmiSource().records(tmp_path)}
    marked = records["1.1"]
    assert marked.source == "images/demd1/1.2.3/1.1.dcm"
    assert marked.boxes == [Box(10, 30, 40, 90, "mass"), Box(5, 5, 8, 9, "calcification")]
    assert (marked.view, marked.laterality, marked.manufacturer) == ("CC", "L", "HOLOGIC, Inc.")
    assert marked.implant is False and marked.special_protocol is False

    flagged = records["1.2"]
    assert (flagged.view, flagged.laterality, flagged.implant, flagged.special_protocol) == ("MLO", "R", True, True)
    assert records["2.1"].source == "images/elsewhere/2.1.dcm"
    assert records["2.1"].manufacturer == "SIEMENS"


def test_omi_unmarked_images_of_non_normal_clients_are_flagged_when_asked(tmp_path):
    write_client(tmp_path, omi_client("demd1", "M", {"1.2": omi_image()}))
    write_client(tmp_path, omi_client("demd2", "N", {"2.1": omi_image()}))
    strict = {r.image_id: r for r in OmiSource(healthy_statuses=["N"]).records(tmp_path)}
    assert "unlocalised_findings" in strict["1.2"].extra
    assert "unlocalised_findings" not in strict["2.1"].extra
    lenient = {r.image_id: r for r in OmiSource().records(tmp_path)}
    assert "unlocalised_findings" not in lenient["1.2"].extra


def test_omi_errors_name_the_file(tmp_path):
    with pytest.raises(SourceError, match="data"):
        list(OmiSource().records(tmp_path))
    path = tmp_path / "data" / "c" / "c.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(SourceError, match="c.json"):
        list(OmiSource().records(tmp_path))
    write_client(tmp_path, omi_client("c", "M", {"1": omi_image(marks=[("a", 1, 2, 3, "mass")])}))
    with pytest.raises(SourceError, match="c.json"):
        list(OmiSource().records(tmp_path))


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
    omi = tmp_path / "omi"
    write_client(omi, omi_client("c", "N", {"9.9": omi_image()}))
    (tmp_path / "vindr").symlink_to(vindr_dir)
    cfg = OmegaConf.load(CONF / "dataset" / "fusion.yaml").source
    source = instantiate(cfg)
    assert isinstance(source, CombinedSource)
    sources = sorted(r.source for r in source.records(tmp_path))
    assert sources == ["omi/images/c/1.2.3/9.9.dcm", "vindr/images/st1/healthy.dicom",
                       "vindr/images/st1/multi.dicom", "vindr/images/st2/unboxed.dicom"]


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
