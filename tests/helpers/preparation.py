"""Small raw sets for preparation tests: phantom DICOMs in folder, VinDr and OMI-DB release layouts."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pydicom
from hydra import compose, initialize_config_dir

import mame_lightning

from mame_lightning.data.dicom_writer import make_mammogram_dataset, save_dataset
from mame_lightning.data.prepare.preparation import worker_setup
from mame_lightning.data.synthetic.phantoms import PhantomSpec, render_phantom

CONF_DIR = Path(mame_lightning.CONF_DIR)
HEIGHT, WIDTH, SIZE = 128, 104, 52  # scale 0.5: resized 64x52, crop rows 6..58
PHI = {"patient_name": "Phiname^Secretia", "patient_id": "PHIID734501",
       "birth_date": "19471231", "accession": "PHIACC99817"}
MANUFACTURERS = {"siemens": "SIEMENS", "hologic": "HOLOGIC, Inc.", "other": "GE MEDICAL SYSTEMS"}


def phantom_dataset(*, view="CC", laterality="L", drawn=None, vendor="siemens", area="medium",
                    lesions=(), seed=0, height=HEIGHT, width=WIDTH, **kwargs):
    """A DICOM dataset of a phantom; ``drawn`` is the breast side as painted (default: the tag)."""
    spec = PhantomSpec(height=height, width=width, view=view if view in ("CC", "MLO") else "CC",
                       laterality=drawn or laterality, area=area, lesions=tuple(lesions),
                       vendor=vendor if vendor in ("siemens", "hologic") else "other")
    phantom = render_phantom(spec, np.random.default_rng(seed))
    pixels = np.rint(phantom.image * 4095).astype(np.uint16)
    options = {**PHI, "bits_stored": 12, "view": view, "laterality": laterality,
               "manufacturer": MANUFACTURERS.get(vendor, vendor), **kwargs}
    return make_mammogram_dataset(pixels, **options), phantom


def write_dicom(path: Path, transfer_syntax="explicit", **kwargs):
    ds, phantom = phantom_dataset(**kwargs)
    save_dataset(ds, path, transfer_syntax)
    return phantom


def add_view_modifier(path: Path, meaning: str) -> None:
    """Give a saved image a view modifier (spot compression, magnification) in its view code."""
    ds = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "R-102D2", "SRT", meaning
    view = pydicom.Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "R-10242", "SRT", "cranio-caudal"
    view.ViewModifierCodeSequence = [item]
    ds.ViewCodeSequence = [view]
    ds.save_as(path)


def break_compressed_stream(path: Path) -> None:
    """Keep the JPEG 2000 file readable but replace its codestream with zeros."""
    ds = pydicom.dcmread(path)
    first = next(pydicom.encaps.generate_frames(ds.PixelData))
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * len(first)])
    ds.save_as(path)


def write_bad_inputs(root: Path) -> dict[str, str]:
    """Every kind of broken file; returns relative path -> words its reason must contain."""
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad/notes.dcm").write_text("this is a text file\n" * 10)
    write_dicom(root / "bad/truncated.dcm", seed=11)
    data = (root / "bad/truncated.dcm").read_bytes()
    (root / "bad/truncated.dcm").write_bytes(data[: len(data) // 2])
    write_dicom(root / "bad/nopixels.dcm", seed=12, extra={"PixelData": None})
    write_dicom(root / "bad/broken_j2k.dcm", "jpeg2000", seed=13)
    break_compressed_stream(root / "bad/broken_j2k.dcm")
    return {"bad/notes.dcm": "not a dicom", "bad/truncated.dcm": "truncated",
            "bad/nopixels.dcm": "pixel data", "bad/broken_j2k.dcm": "decode"}


# --- VinDr and OMI-DB layouts ---------------------------------------------------------------

VINDR_COLUMNS = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                 "breast_birads", "breast_density", "finding_categories", "finding_birads",
                 "xmin", "ymin", "xmax", "ymax", "split"]


def write_vindr(root: Path, images: list[dict]) -> None:
    """images: dicts with image_id, density, extra_findings [(categories, box)], dicom kwargs.

    An image drawn with ``lesions`` gets one finding row per drawn lesion box, and
    ``missing=True`` lists an image without writing its file.
    """
    breast, findings = [], []
    for image in images:
        base = {"study_id": image.get("study", "st"), "series_id": "se", "image_id": image["image_id"],
                "laterality": image.get("laterality", "L"), "view_position": image.get("view", "CC"),
                "height": HEIGHT, "width": WIDTH, "breast_birads": "BI-RADS 1",
                "breast_density": f"DENSITY {image.get('density', 'B')}", "split": "training"}
        breast.append(base)
        rows = []
        if not image.get("missing"):
            kwargs = {k: image[k] for k in ("laterality", "view", "vendor", "area", "lesions", "seed",
                                            "drawn") if k in image}
            phantom = write_dicom(root / "images" / base["study_id"] / f"{image['image_id']}.dicom", **kwargs)
            rows = [([cats] if isinstance(cats, str) else list(cats), box.to_list()[:4])
                    for box, cats in zip(phantom.boxes, phantom.categories)]
        rows += image.get("extra_findings", [])
        for categories, box in rows or [(["No Finding"], None)]:
            row = {**base, "finding_categories": repr(list(categories))}
            row.update(dict(zip(("xmin", "ymin", "xmax", "ymax"), box or ("", "", "", ""))))
            findings.append(row)
    for name, rows in (("breast-level_annotations.csv", breast), ("finding_annotations.csv", findings)):
        with open(root / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=VINDR_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def write_omi(root: Path, images: list[dict], client="demd100", lesion_sides=None, study="1.9") -> dict:
    """One OMI-DB client in the release layout (tests/helpers/omi_layout.py): images are dicts with sop,
    marks [(x1, y1, x2, y2, flag)] or ``"drawn"`` (a Mass mark around each drawn lesion),
    ``missing=True`` (JSON header only, no .dcm) and dicom kwargs (vendor, view, laterality,
    lesions, implant, extra={"SeriesDescription": ...}, ...). Returns the phantoms by sop."""
    from helpers.omi_layout import mark, write_client, write_header

    marks, phantoms = {}, {}
    for image in images:
        kwargs = {k: image[k] for k in ("laterality", "view", "area", "lesions", "seed", "drawn", "implant",
                                        "extra") if k in image}
        ds, phantoms[image["sop"]] = phantom_dataset(vendor=image.get("vendor", "hologic"), sop_uid=image["sop"],
                                                     **kwargs)
        if not image.get("missing"):
            save_dataset(ds, root / "images" / client / study / f"{image['sop']}.dcm")
        write_header(root, client, study, image["sop"], ds)
        listed = image.get("marks", [])
        if listed == "drawn":
            listed = [(int(np.floor(b.x0)), int(np.floor(b.y0)), int(np.ceil(b.x1)), int(np.ceil(b.y1)), "Mass")
                      for b in phantoms[image["sop"]].boxes]
        marks[image["sop"]] = [mark(number, *m[:4], *m[4:]) for number, m in enumerate(listed, 1)]
    write_client(root, client, {study: marks}, lesion_sides, headers=False)
    return phantoms


# --- configs and outputs ----------------------------------------------------------------------


def compose_prepare(dataset: str, raw_dir: Path, out_dir: Path, *overrides: str):
    """The composed prepare config, as the CLI would build it, for a test raw/out folder."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("prepare", overrides=[
            f"dataset={dataset}", f"dataset.raw_dir={raw_dir}", f"dataset.prepared_dir={out_dir}",
            f"dataset.size={SIZE}", "preparation.num_workers=0", "preparation.progress=false",
            *overrides])


def read_lines(out_dir: Path, task: str) -> list[dict]:
    text = (out_dir / task / "metadata.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def all_lines(out_dir: Path) -> dict[str, dict]:
    """Every kept item by its source path."""
    return {line["source"]: {**line, "task": task}
            for task in ("text2image", "inpaint") for line in read_lines(out_dir, task)}


VOLATILE_REPORT_KEYS = ("elapsed_s", "run")


def snapshot(out_dir: Path) -> dict[str, bytes]:
    """Every output file's bytes (report.json without its run-specific keys)."""
    files = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(out_dir).as_posix()
        data = path.read_bytes()
        if rel == "report.json":
            report = json.loads(data)
            for key in VOLATILE_REPORT_KEYS:
                report.pop(key, None)
            data = json.dumps(report, sort_keys=True).encode()
        files[rel] = data
    return files


WORKER_LOG_ENV = "MAME_TEST_WORKER_LOG"


def counting_worker_setup() -> None:
    """Preparation's worker initializer, leaving a file per worker (named by its pid) that says
    the thread limits it runs with."""
    worker_setup()
    torch = sys.modules.get("torch")
    facts = {"omp": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads() if torch else None}
    (Path(os.environ[WORKER_LOG_ENV]) / str(os.getpid())).write_text(json.dumps(facts))
