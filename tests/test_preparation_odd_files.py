"""Odd files never stop a preparation: non-UTF-8 names, symlink loops and links out of raw_dir, huge headers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydicom
import pytest

from mame_lightning.data.dicom import DicomError, read_dicom
from mame_lightning.data.prepare.preparation import prepare_dataset
from helpers.preparation import compose_prepare, write_dicom

ODD_NAME = os.fsdecode(b"caf\xe9_\xff.dcm")  # Latin-1 bytes from an old PACS export: not UTF-8


def entries(report: dict, status: str) -> dict[str, str]:
    return {entry["file"]: entry["kind"] for entry in report[status]}


def metadata_sources(out: Path) -> list[str]:
    data = (out / "text2image" / "metadata.jsonl").read_bytes().decode("utf-8")  # valid UTF-8 throughout
    return sorted(json.loads(line)["source"] for line in data.splitlines())


def test_a_file_name_that_is_not_utf8_is_prepared_like_any_other(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_dicom(raw / "plain.dcm", seed=1)
    write_dicom(raw / ODD_NAME, seed=2)
    report = prepare_dataset(compose_prepare("folder", raw, out))
    assert report["kept"] == 2 and report["rejected"] == []
    assert metadata_sources(out) == ["caf\\xe9_\\xff.dcm", "plain.dcm"]
    for name in ("report.json", "attributes.json"):
        json.loads((out / name).read_bytes().decode("utf-8"))
    assert "\\udc" not in (out / "report.json").read_text()  # no lone-surrogate escapes for strict readers
    again = prepare_dataset(compose_prepare("folder", raw, out))  # and a re-run reuses both
    assert again["run"]["reused"] == 2 and again["run"]["processed"] == 0


def symlinked_raw(tmp_path: Path) -> tuple[Path, Path]:
    raw, elsewhere = tmp_path / "raw", tmp_path / "elsewhere"
    write_dicom(raw / "real.dcm", seed=1)
    write_dicom(elsewhere / "other_patient.dcm", seed=2)
    write_dicom(elsewhere / "folder" / "deep.dcm", seed=3)
    (raw / "loop.dcm").symlink_to("loop.dcm")
    (raw / "a.dcm").symlink_to("b.dcm")
    (raw / "b.dcm").symlink_to("a.dcm")
    (raw / "dangling.dcm").symlink_to("gone.dcm")
    (raw / "alias.dcm").symlink_to("real.dcm")  # inside raw_dir: followed
    (raw / "out.dcm").symlink_to(elsewhere / "other_patient.dcm")
    (raw / "linked_folder").symlink_to(elsewhere / "folder", target_is_directory=True)
    (raw / "sub").mkdir()
    (raw / "sub" / "up").symlink_to("..", target_is_directory=True)  # a folder loop
    return raw, tmp_path / "out"


def test_symlink_loops_are_loops_and_links_out_of_raw_dir_are_not_followed(tmp_path):
    raw, out = symlinked_raw(tmp_path)
    report = prepare_dataset(compose_prepare("folder", raw, out))
    assert entries(report, "rejected") == {
        "loop.dcm": "symlink loop", "a.dcm": "symlink loop", "b.dcm": "symlink loop",
        "dangling.dcm": "broken symlink", "out.dcm": "symlink outside raw_dir"}
    assert sorted(line for line in metadata_sources(out)) == ["alias.dcm", "real.dcm"]
    reasons = {entry["file"]: entry["reason"] for entry in report["rejected"]}
    assert "dataset.follow_symlinks=true" in reasons["out.dcm"] and str(tmp_path) not in json.dumps(reasons)


def test_follow_symlinks_true_follows_them_and_still_stops_at_loops(tmp_path):
    raw, out = symlinked_raw(tmp_path)
    report = prepare_dataset(compose_prepare("folder", raw, out, "dataset.follow_symlinks=true"))
    assert metadata_sources(out) == ["alias.dcm", "linked_folder/deep.dcm", "out.dcm", "real.dcm"]
    assert set(entries(report, "rejected").values()) == {"symlink loop", "broken symlink"}


def huge_rle(path: Path, rows: int = 40000, columns: int = 40000) -> Path:
    """A valid small RLE file whose header then claims rows x columns (about 1 KB on disk)."""
    write_dicom(path, "rle", seed=4, height=32, width=26)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(path)
    return path


def test_a_header_claiming_gigapixels_is_refused_before_decoding(tmp_path, monkeypatch):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_dicom(raw / "normal.dcm", seed=1)
    bomb = huge_rle(raw / "bomb.dcm")
    assert bomb.stat().st_size < 4096

    def no_decoding(self):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_decoding))
    with pytest.raises(DicomError, match=r"too large .*40000x40000 is 1600 megapixels.*limit of 80 megapixels"):
        read_dicom(bomb, max_pixels=80_000_000)
    monkeypatch.undo()

    report = prepare_dataset(compose_prepare("folder", raw, out))
    assert entries(report, "rejected") == {"bomb.dcm": "too large"}
    assert "preparation.max_pixels" in report["rejected"][0]["reason"] and report["kept"] == 1
    report = prepare_dataset(compose_prepare("folder", raw, tmp_path / "out2", "preparation.max_pixels=100"))
    assert entries(report, "rejected") == {"bomb.dcm": "too large", "normal.dcm": "too large"}


@pytest.mark.timeout(120)
def test_pipes_and_folders_named_like_dicoms_are_rejected_without_hanging(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_dicom(raw / "normal.dcm", seed=1)
    os.mkfifo(raw / "pipe.dcm")
    os.mkfifo(raw / "IMG0001")  # no extension: listing must not open it to look for the DICM marker
    (raw / "folder.dcm").mkdir()
    report = prepare_dataset(compose_prepare("folder", raw, out))
    assert entries(report, "rejected") == {"pipe.dcm": "not a regular file"} and report["kept"] == 1
