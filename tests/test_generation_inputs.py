"""Generation inputs: outputs name them by hash (no path, no identity), and huge images are refused unread."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from mame_lightning import generate
from mame_lightning.data.dicom_writer import make_mammogram_dataset, save_dataset
from mame_lightning.pipelines.inputs import InputError, load_input_image

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["steps=2", "device=cpu", "progress=false", "n=1"]
IDENTITY = {"patient_name": "DOE^JANE", "patient_id": "MRN998877", "birth_date": "19700101",
            "accession": "ACC55501"}
FOLDER = "DOE^JANE_MRN998877_19700101"
FILE = "1.2.840.99.12345.dcm"  # PACS exports name files by SOP Instance UID


def run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["generate", *args])
    generate.cli()


def identified_dicom(root: Path) -> Path:
    pixels = np.full((96, 80), 200, np.uint16)
    pixels[:, :40] = 3000
    path = root / FOLDER / FILE
    path.parent.mkdir(parents=True)
    save_dataset(make_mammogram_dataset(pixels, laterality="L", view="CC", **IDENTITY), path)
    return path


def leaks(files: list[Path], *absolute: Path) -> dict[str, list[str]]:
    """Which output files contain an identity string or an absolute path."""
    needles = [*IDENTITY.values(), FOLDER, FILE.removesuffix(".dcm"), *(str(p) for p in absolute)]
    found = {}
    for path in files:
        data = path.read_bytes()
        hits = [n for n in needles if n.encode() in data]
        if hits:
            found[path.name] = hits
    return found


def test_cli_outputs_name_the_input_by_hash_and_hold_no_path(monkeypatch, inpaint_dir, tmp_path):
    image = identified_dicom(tmp_path)
    out = tmp_path / "out"
    run_cli(monkeypatch, f"model_path={inpaint_dir}", f"image={image}", "box=5,5,30,30", "dicom=true",
            f"out={out}", *FAST)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".png", ".dcm", ".csv", ".json"}
    assert leaks(files, tmp_path, inpaint_dir) == {}
    from mame_lightning.pipelines.marking import read_png_text

    text = read_png_text(out / "mask.png")
    assert text["image"].startswith("sha256-") and text["image"].endswith(".dcm")
    assert read_png_text(out / "0000_seed0.png")["model"] == "generation_models/export_inpaint"


def test_app_downloads_name_the_upload_by_hash_and_hold_no_path(inpaint_model, tmp_path):
    from mame_lightning.app import handlers as h

    image = identified_dicom(tmp_path)
    (tmp_path / "app").mkdir()
    ctx = h.AppContext(None, inpaint_model, tmp_path / "app")
    _, _, files, _ = h.inpaint_lesion(ctx, str(image), None, "5,5,30,30", "", "", 4.0, 2, 0, False,
                                      "dpmsolver++", True)
    editor, _ = h.load_image(ctx, str(image))
    paths = [Path(f) for f in files] + [Path(editor["background"])]
    assert len(paths) == 4 and leaks(paths, tmp_path, inpaint_model.path) == {}


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height but holds a few bytes of data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_huge_images_are_refused_from_their_header(tmp_path):
    bomb = png_header(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(InputError, match="too large to open safely"):
        load_input_image(bomb, 64)
    with pytest.raises(InputError, match=r"10000x9000 is 90 megapixels, above the limit of 80 megapixels"):
        load_input_image(png_header(tmp_path / "big.png", 10000, 9000), 64, max_pixels=80_000_000)


def test_cli_refuses_huge_inputs_in_one_line(monkeypatch, inpaint_dir, tmp_path):
    import pydicom

    for name, path in (("png", png_header(tmp_path / "bomb.png", 20000, 20000)),
                       ("dicom", tmp_path / "bomb.dcm")):
        if name == "dicom":
            identified_dicom(tmp_path / "d").rename(path)
            ds = pydicom.dcmread(path)
            ds.Rows = ds.Columns = 40000
            ds.save_as(path)
        with pytest.raises(SystemExit) as err:
            run_cli(monkeypatch, f"model_path={inpaint_dir}", f"image={path}", "box=1,1,9,9",
                    f"out={tmp_path / name}", *FAST)
        message = str(err.value.code)
        assert message.startswith("error: ") and "too large" in message and "\n" not in message
        assert not (tmp_path / name).exists()


def test_app_errors_name_the_upload_not_the_servers_temp_path(inpaint_model, tmp_path):
    import gradio as gr

    from mame_lightning.app import handlers as h
    from helpers.preparation import write_bad_inputs

    uploads = tmp_path / "gradio" / "3f2a9c0d"  # where the server keeps an upload
    bad = write_bad_inputs(uploads)
    png_header(uploads / "bomb.png", 20000, 20000)
    (tmp_path / "app").mkdir()
    ctx = h.AppContext(None, inpaint_model, tmp_path / "app")
    for name in [*bad, "bomb.png"]:
        for call in (lambda: h.load_image(ctx, str(uploads / name)),
                     lambda: h.inpaint_lesion(ctx, str(uploads / name), None, "1,1,9,9", "", "", 4.0, 2, 0, False,
                                              "dpmsolver++", False)):
            with pytest.raises(gr.Error) as err:
                call()
            message = str(err.value)
            assert Path(name).name in message and str(tmp_path) not in message, message
