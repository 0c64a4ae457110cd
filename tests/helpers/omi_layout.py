"""OMI-DB fixtures in the release layout (docs/source/structure.rst of the omidb package), and the
omidb package's own reading of a tree, which the tests use as the judge of that layout."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from mame_lightning.data.dicom import PHI_KEYWORDS

FLAGS = ("Mass", "SuspiciousCalcifications", "ArchitecturalDistortion", "FocalAsymmetry")


def mark(mark_id: int, x1, y1, x2, y2, *flags: str, **fields) -> dict:
    """One IMAGEDB mark: corners as text (as the release writes them), flags 1/0."""
    values = {"MarkID": mark_id, "X1": str(x1), "Y1": str(y1), "X2": str(x2), "Y2": str(y2),
              "Conspicuity": "Obvious", "LinkedNBSSLesionNumber": "1"}
    values.update({name: int(name in flags) for name in FLAGS})
    values.update(fields)
    return values


def imagedb(studies: dict[str, dict[str, list[dict]]], series_prefix: str = "9.9") -> dict:
    """``{"Site", "STUDIES"}`` from study UID -> image UID -> marks (each image in its own series)."""
    out = {}
    for number, (study, images) in enumerate(studies.items()):
        entry = {"StudyDate": "20150304", "EpisodeID": "1"}
        for index, (image, marks) in enumerate(images.items()):
            entry[f"{series_prefix}.{number}.{index}"] = {image: {str(m["MarkID"]): m for m in marks}}
        out[study] = entry
    return {"Site": "TST", "STUDIES": out}


def nbss(lesion_sides: dict[str, int] | None = None) -> dict:
    """One screening episode; ``{"L": 2}`` adds two LESION entries on the left."""
    episode = {"EpisodeType": "R", "EpisodeIsClosed": "Y", "EpisodeOpenedDate": "2015-03-01",
               "SCREENING": {side: {"DateTaken": "2015-03-04", "Opinion": "RN"} for side in "LR"}}
    if lesion_sides:
        episode["LESION"] = {side: {str(i + 1): {"LesionDescription": "MA"} for i in range(count)}
                             for side, count in lesion_sides.items()}
    return {"1": episode}


def header_json(ds: pydicom.Dataset) -> dict:
    """A dataset's header as the release ships it: DICOM JSON model, no pixels, no identifiers."""
    header = pydicom.Dataset(ds)
    for keyword in (*PHI_KEYWORDS, "PixelData"):
        header.pop(keyword, None)
    return header.to_json_dict()


def minimal_header(image: str, manufacturer: str = "HOLOGIC, Inc.") -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPInstanceUID, ds.Modality, ds.Manufacturer = image, "MG", manufacturer
    return ds


def write_client(root: Path, client: str, studies: dict[str, dict[str, list[dict]]],
                 lesion_sides: dict[str, int] | None = None, *, upper: bool = False,
                 headers: bool = True) -> Path:
    """``data/<client>/imagedb_<client>.json`` and ``nbss_<client>.json`` (``IMAGEDB_``/``NBSS_`` when
    upper), and with ``headers`` a small JSON header per image in its study folder (omidb lists a
    study only when that folder exists)."""
    folder = root / "data" / client
    folder.mkdir(parents=True, exist_ok=True)
    names = ("IMAGEDB", "NBSS") if upper else ("imagedb", "nbss")
    (folder / f"{names[0]}_{client}.json").write_text(json.dumps(imagedb(studies)))
    (folder / f"{names[1]}_{client}.json").write_text(json.dumps(nbss(lesion_sides)))
    for study, images in studies.items() if headers else ():
        for image in images:
            write_header(root, client, study, image, minimal_header(image))
    return folder


def write_header(root: Path, client: str, study: str, image: str, ds: pydicom.Dataset,
                 suffix: str = ".json") -> Path:
    path = root / "data" / client / study / f"{image}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(header_json(ds)))
    return path


def omidb_view(root: Path) -> dict[str, dict[str, list[tuple[int, int, int, int]]]]:
    """What the omidb package reads from ``root``: client -> image UID -> mark boxes (x1, y1, x2, y2)."""
    import omidb
    from loguru import logger

    logger.disable("omidb")  # it logs every unlinked study and unknown enum value
    view: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {}
    for client in omidb.DB(root / "data", root / "images"):
        images = view.setdefault(client.id, {})
        for episode in client.episodes:
            for study in episode.studies:
                for series in study.series:
                    for image in series.images:
                        images[image.id] = [(m.boundingBox.x1, m.boundingBox.y1, m.boundingBox.x2,
                                             m.boundingBox.y2) for m in image.marks]
    return view
