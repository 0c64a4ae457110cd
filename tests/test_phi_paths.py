"""Patient identity in file paths: a PACS export named after its patients prepares without any of
that identity reaching an output file, the report or the log; other paths stay as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pydicom

from mame_lightning.data.prepare.identity import hidden_path, identity_strings, read_identity, reveals_identity
from helpers.preparation import PHI, SIZE, write_dicom

# Every spelling of the fixture patient's identity that a path below uses.
FORBIDDEN = ("phiname", "secretia", PHI["patient_id"].lower(), PHI["accession"].lower(), PHI["birth_date"],
             "1947-12-31", "31.12.1947")


def identity_of(**values) -> tuple[set[str], set[str]]:
    ds = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return identity_strings(ds)


def test_identity_strings_and_which_paths_reveal_them():
    identity = identity_of(PatientName="DOE^JANE^A", PatientID="12345678", AccessionNumber="AC",
                           PatientBirthDate="19471231")
    texts, dates = identity
    assert texts == {"doe", "jane", "12345678"}  # name parts of 3+ letters; a 2-letter accession is too short
    assert "19471231" in dates and "31121947" in dates
    for path in ("DOE^JANE/1.dcm", "12345678_Smith/img", "scans/jane-cc.dcm", "x/born_31.12.1947/a.dcm",
                 "Doe/1.dcm"):
        assert reveals_identity(path, identity), path
    for path in ("scans/cc.dcm", "AC/img.dcm", "Smith_2020/1.dcm", "1947/12/a.dcm"):
        assert not reveals_identity(path, identity), path
    assert not reveals_identity("DOE^JANE/1.dcm", identity_of(PatientName="SMITH^ANNA"))  # not this file's


def test_hidden_path_is_a_stable_salted_hash():
    first = hidden_path("DOE^JANE/1.dcm", "salt")
    assert first == hidden_path("DOE^JANE/1.dcm", "salt") and first.startswith("hidden/") and first.endswith(".dcm")
    assert first != hidden_path("DOE^JANE/1.dcm", "other") != hidden_path("DOE^JANE/2.dcm", "salt")
    assert "doe" not in first.lower() and "jane" not in first.lower()
    assert hidden_path("Phiname^Secretia/IMG0001", "s").count(".") == 0  # no made-up extension


def write_export(raw):
    """A PACS-style export: folders and files named after the patient, and one clean folder."""
    write_dicom(raw / "Phiname^Secretia" / "cc_left.dcm", seed=1)
    write_dicom(raw / f"{PHI['patient_id']}_study" / "IMG0002", view="MLO", laterality="R", seed=2)
    write_dicom(raw / "scans" / "secretia-1947-12-31.dcm", seed=3)
    write_dicom(raw / "by_accession" / PHI["accession"] / "a.dcm", seed=4)
    write_dicom(raw / "by_date" / "born_31.12.1947" / "b.dcm", seed=5, laterality="R", drawn="L")  # tag disagrees
    write_dicom(raw / "Phiname^Secretia" / "xccl.dcm", view="XCCL", seed=6)  # filtered
    write_dicom(raw / "Phiname^Secretia" / "odd_voi.dcm", seed=7, window=(2000.0, 4000.0), voi_function="BOGUS")
    write_dicom(raw / "Phiname^Secretia" / "broken.dcm", seed=8)
    data = (raw / "Phiname^Secretia" / "broken.dcm").read_bytes()
    (raw / "Phiname^Secretia" / "broken.dcm").write_bytes(data[: len(data) - 500])  # rejected: truncated
    write_dicom(raw / "clean" / "other.dcm", seed=9)  # same patient, nothing of it in the path
    write_dicom(raw / "Smith^Anna" / "c.dcm", seed=10)  # someone else's name: not this file's identity
    return 8  # paths that hold their own file's identity


def test_no_identity_in_any_output_file_report_or_log(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    scrubbed = write_export(raw)
    assert read_identity(raw / "Phiname^Secretia" / "broken.dcm")[0]  # still readable for the check
    env = {**os.environ, "MAME_ROOT": str(tmp_path / "root")}
    command = [sys.executable, "-m", "mame_lightning.prepare", "dataset=folder", f"dataset.raw_dir={raw}",
               f"dataset.prepared_dir={out}", f"dataset.size={SIZE}", "preparation.num_workers=0",
               f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["scrubbed_paths"] == scrubbed
    assert f"paths hidden for patient identity {scrubbed}" in proc.stdout + proc.stderr
    files = {e["file"] for e in report["filtered"] + report["rejected"]}
    files |= {d["file"] for d in report["orientation_disagreements"]}
    lines = [json.loads(line) for task in ("text2image", "inpaint")
             for line in (out / task / "metadata.jsonl").read_text().splitlines()]
    sources = {line["source"] for line in lines}
    assert {"clean/other.dcm", "Smith^Anna/c.dcm"} <= sources  # paths without identity stay
    assert len([s for s in sources | files if s.startswith("hidden/")]) == scrubbed
    assert report["counts"]["rejected"] == {"truncated": 1} and report["counts"]["filtered"] == {"view": 1}
    assert report["counts"]["orientation_disagreements"] == 1
    logs = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" and "VOI LUT not applied" in p.read_text() for p in logs)  # a warning named the file

    texts = {"stdout": proc.stdout, "stderr": proc.stderr}
    texts |= {str(p): p.read_bytes().decode("latin-1") for p in [*out.rglob("*"), *logs] if p.is_file()}
    for where, text in texts.items():
        lowered = text.lower()
        leaked = [value for value in FORBIDDEN if value in lowered]
        assert not leaked, f"{leaked} in {where}"

    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert again.returncode == 0
    assert {json.loads(line)["source"] for task in ("text2image", "inpaint")
            for line in (out / task / "metadata.jsonl").read_text().splitlines()} == sources  # stable hashes
