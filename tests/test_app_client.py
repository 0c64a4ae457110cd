"""The GUI's API through gradio_client: every named endpoint against the tiny models, bad inputs, serving."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from helpers.app import start_app
from helpers.dicom_factory import half_disc_phantom, write_phantom
from helpers.generation import SIZE, breast_image
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from mame_lightning.app import handlers as h  # noqa: E402
from mame_lightning.app.server import auth_from, load_config, load_models  # noqa: E402
from mame_lightning.data.dicom import tag_metadata  # noqa: E402
from mame_lightning.pipelines.generation import GenerationSettings, inpaint, repaint_region, text2image  # noqa: E402
from mame_lightning.pipelines.inputs import inpaint_mask, load_input_image  # noqa: E402
from mame_lightning.pipelines.marking import read_png_text  # noqa: E402

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]

NAMED = {"/generate", "/compose_prompt", "/load_image", "/load_example", "/inpaint", "/send_to_inpaint",
         "/full_generate", "/full_inpaint"}
PROMPT = "a siemens mammogram in MLO view with high density and small area"
ATTRS = dict(source="attributes", vendor="siemens", view="MLO", density="high", area="small", free_prompt="")
SAMPLING = dict(negative="", guidance=4.0, steps=2, scheduler="dpmsolver++")
BRUSH = (slice(20, 36), slice(24, 40))  # rows, columns painted on the editor layer


@pytest.fixture(scope="module")
def app(t2i_dir, inpaint_dir):
    running = start_app(text2image=t2i_dir, inpaint=inpaint_dir)
    yield running
    running.close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def client(app, downloads):
    return Client(app.url, verbose=False, download_files=str(downloads))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files: a breast PNG at the model size, a brush layer, and a right-breast DICOM."""
    root = tmp_path_factory.mktemp("app_inputs")
    Image.fromarray(breast_image(SIZE, seed=3)).save(root / "breast.png")
    layer = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    layer[BRUSH] = (255, 48, 48, 255)
    Image.fromarray(layer).save(root / "layer.png")
    write_phantom(root / "case.dcm", half_disc_phantom(96, 80, side="right"), laterality="R", view="CC")
    return root


def gray(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def brush_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[BRUSH] = 255
    return mask


def editor(background=None, layer=None) -> dict:
    return {"background": handle_file(str(background)) if background else None,
            "layers": [handle_file(str(layer))] if layer else [], "composite": None}


def generate(client, seed=7, n=2, **overrides):
    kwargs = {**ATTRS, **SAMPLING, "seed": seed, "random_seed": False, "n": n, "dicom": False, **overrides}
    return client.predict(api_name="/generate", **kwargs)


def inpaint_call(client, upload=None, editor_value=None, box="", seed=3, dicom=False):
    return client.predict(upload=handle_file(str(upload)) if upload else None, editor=editor_value or editor(),
                          box=box, prompt="a mammogram with a lesion", seed=seed, random_seed=False, dicom=dicom,
                          api_name="/inpaint", **SAMPLING)


# ---------------------------------------------------------------------------------------- serving


def test_serves_loopback_only_with_named_endpoints_and_one_shared_model_queue(app, client):
    assert app.url.startswith("http://127.0.0.1:")
    assert app.blocks.share is False and app.blocks.share_url is None and app.blocks.analytics_enabled is False
    assert NAMED <= set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    heavy = [fn for fn in app.blocks.fns.values() if f"/{fn.api_name}" in NAMED - {"/compose_prompt", "/send_to_inpaint"}]
    assert len(heavy) == 6 and {fn.concurrency_id for fn in heavy} == {"models"}
    generate(client, n=1)  # the queue sets up a concurrency group when its first job arrives
    queue = app.blocks._queue
    assert queue.max_size == 16 and queue.event_queue_per_concurrency_id["models"].concurrency_limit == 1


def test_auth_needs_both_names_and_reads_the_environment():
    cfg = load_config([])
    assert auth_from(cfg, {}) is None
    assert auth_from(cfg, {"MAME_APP_USER": "reader", "MAME_APP_PASSWORD": "s3cret"}) == ("reader", "s3cret")
    with pytest.raises(ValueError, match="both a username and a password"):
        auth_from(cfg, {"MAME_APP_USER": "reader"})


def test_models_are_checked_at_start(t2i_dir, inpaint_dir):
    with pytest.raises(ValueError, match="no model given"):
        load_models(load_config([]))
    with pytest.raises(ValueError, match=r"is a inpaint model; pass it as model.inpaint="):
        load_models(load_config([f"model.text2image={inpaint_dir}", "model.device=cpu"]))


def test_module_entry_point_explains_a_missing_model():
    done = subprocess.run([sys.executable, "-m", "mame_lightning.app"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "model.text2image=EXPORT_DIR" in done.stderr


# --------------------------------------------------------------------------------------- generate


def test_compose_prompt_shows_the_models_template(client):
    assert client.predict(api_name="/compose_prompt", **ATTRS) == PROMPT
    assert client.predict(api_name="/compose_prompt", **{**ATTRS, "density": "C"}) == PROMPT  # BI-RADS letter
    only_view = client.predict(api_name="/compose_prompt", **{**ATTRS, "vendor": "", "density": "", "area": ""})
    assert only_view == "a mammogram in MLO view"
    free = client.predict(api_name="/compose_prompt", **{**ATTRS, "source": "free text", "free_prompt": "a CC mammogram"})
    assert free == "a CC mammogram"


def test_generate_is_reproducible_marked_and_equal_to_the_pipeline(client, t2i_model):
    gallery, prompt, seed, downloads = generate(client, seed=7, n=2)
    again, _, _, _ = generate(client, seed=7, n=2)
    other, _, _, _ = generate(client, seed=8, n=1)
    assert prompt == PROMPT and seed == 7 and len(gallery) == 2 and len(downloads) == 2
    first = [gray(item["image"]) for item in gallery]
    assert all(np.array_equal(a, gray(b["image"])) for a, b in zip(first, again))
    assert not np.array_equal(first[0], gray(other[0]["image"]))
    assert np.array_equal(first[1], gray(other[0]["image"]))  # image i uses seed + i
    direct = text2image(t2i_model, PROMPT, 2, GenerationSettings(guidance=4.0, steps=2, seed=7, progress=False))
    assert all(np.array_equal(d.image, img) for d, img in zip(direct, first))
    text = read_png_text(downloads[0])
    assert text["synthetic"] == "true" and text["prompt"] == PROMPT and text["seed"] == "7"


def test_random_seed_is_reported_and_reproduces(client):
    gallery, _, seed, _ = generate(client, seed=0, n=1, random_seed=True)
    again, _, same, _ = generate(client, seed=seed, n=1)
    assert same == seed and np.array_equal(gray(gallery[0]["image"]), gray(again[0]["image"]))


def test_scheduler_is_chosen_per_request_and_recorded(app, client):
    dpm, _, _, dpm_files = generate(client, seed=4, n=1)
    ddim, _, _, ddim_files = generate(client, seed=4, n=1, scheduler="ddim")
    assert not np.array_equal(gray(dpm[0]["image"]), gray(ddim[0]["image"]))
    assert read_png_text(ddim_files[0])["scheduler"] == "ddim" and read_png_text(dpm_files[0])["scheduler"] == "dpmsolver++"
    shared = app.context.text2image
    assert shared.scheduler == "dpmsolver++" and type(shared.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_dicom_download_has_no_patient_identity(client):
    _, _, _, downloads = generate(client, seed=1, n=1, dicom=True)
    dcm = [f for f in downloads if f.endswith(".dcm")]
    assert len(dcm) == 1
    ds = pydicom.dcmread(dcm[0])
    assert str(ds.PatientName) == "SYNTHETIC^IMAGE" and ds.PatientID == "SYNTHETIC" and not ds.PatientBirthDate
    assert "Synthetic image" in ds.ImageComments and tag_metadata(ds)["view"] == "MLO"


# ---------------------------------------------------------------------------------------- inpaint


def test_brush_inpainting_changes_only_the_region(client, files, inpaint_model):
    before, after, downloads, seed = inpaint_call(client, upload=files / "breast.png",
                                                  editor_value=editor(files / "breast.png", files / "layer.png"))
    result, mask = gray(downloads[0]), gray(downloads[1])
    original = breast_image(SIZE, seed=3)
    assert np.array_equal(mask > 0, brush_mask() > 0)
    reach = repaint_region(mask, inpaint_model.vae_scale_factor)
    assert np.array_equal(result[~reach], original[~reach])
    assert np.abs(result[mask > 0].astype(int) - original[mask > 0]).mean() > 5
    direct = inpaint(inpaint_model, original, brush_mask(), "a mammogram with a lesion", 1,
                     GenerationSettings(guidance=4.0, steps=2, seed=seed, progress=False))[0]
    assert np.array_equal(direct.image, result)
    assert read_png_text(downloads[0])["synthetic"] == "true"
    assert gray(before).shape == gray(after).shape and gray(before).shape[0] >= 4 * SIZE  # enlarged for display


def test_dicom_upload_goes_through_the_dicom_path_and_box_maps_to_it(client, files):
    shown, info = client.predict(upload=handle_file(str(files / "case.dcm")), api_name="/load_image")
    prepared = load_input_image(files / "case.dcm", SIZE)
    assert np.array_equal(gray(shown["background"]), prepared.image) and "flipped" in info
    _, _, downloads, _ = inpaint_call(client, upload=files / "case.dcm", box="30,30,60,60", dicom=True)
    assert np.array_equal(gray(downloads[1]), inpaint_mask(prepared, box="30,30,60,60"))
    assert tag_metadata(pydicom.dcmread([f for f in downloads if f.endswith(".dcm")][0]))["view"] == "CC"


def test_example_and_generated_images_feed_the_inpaint_tab(client, files):
    upload, shown, _ = client.predict(api_name="/load_example")
    _, _, downloads, _ = inpaint_call(client, upload=upload, editor_value=editor(shown["background"], files / "layer.png"))
    assert np.array_equal(gray(downloads[1]) > 0, brush_mask() > 0)
    gallery, _, _, _ = generate(client, seed=2, n=1)
    cleared, sent, _ = client.predict(
        gallery=[{"image": handle_file(item["image"]), "caption": item["caption"]} for item in gallery],
        api_name="/send_to_inpaint")
    assert cleared is None and np.array_equal(gray(sent["background"]), gray(gallery[0]["image"]))


# ---------------------------------------------------------------------------------- full pipeline


def test_full_flow_writes_image_mask_and_vindr_row(client, files, t2i_model, inpaint_model):
    shown, prompt, seed = client.predict(**ATTRS, **SAMPLING, seed=11, random_seed=False, api_name="/full_generate")
    healthy = gray(shown["background"])
    direct = text2image(t2i_model, PROMPT, 1, GenerationSettings(guidance=4.0, steps=2, seed=11, progress=False))[0]
    assert prompt == PROMPT and seed == 11 and np.array_equal(healthy, direct.image)
    result, downloads, table = client.predict(editor=editor(shown["background"], files / "layer.png"), box="",
                                              lesion_prompt="", category="Mass", birads="BI-RADS 4", dicom=False,
                                              api_name="/full_inpaint", **SAMPLING)
    image, mask, sheet = downloads
    with open(sheet, newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert [int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")] == [24, 20, 40, 36]
    assert row["view_position"] == "MLO" and row["breast_density"] == "DENSITY C" and row["finding_birads"] == "BI-RADS 4"
    assert row["finding_categories"] == "['Mass']" and table["data"][0][0] == row["image_id"]
    assert np.array_equal(gray(mask) > 0, brush_mask() > 0)
    painted = gray(image)
    outside = ~repaint_region(gray(mask), inpaint_model.vae_scale_factor)
    assert np.array_equal(painted[outside], healthy[outside]) and not np.array_equal(painted, healthy)
    text = read_png_text(image)
    assert text["synthetic"] == "true" and text["lesion_prompt"] == "a mammogram with a lesion" and text["task"] == "full"


# -------------------------------------------------------------------------------------- bad input


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def bad_cases(root):
    """name -> (call(client), expected text in the message)."""
    big = root / "huge.png"
    Image.fromarray(np.zeros((1100, 1000), dtype=np.uint8)).save(big)
    cut = write_phantom(root / "broken.dcm", half_disc_phantom())
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    nopix = write_phantom(root / "report.dcm", half_disc_phantom(), extra={"PixelData": None})
    upload = lambda path: (lambda c: c.predict(upload=handle_file(str(path)), api_name="/load_image"))  # noqa: E731
    return {
        "no mask": (lambda c: inpaint_call(c, upload=root / "breast.png"), "no mask drawn"),
        "no image": (lambda c: inpaint_call(c), "no image"),
        "empty upload": (upload(_write(root / "empty.png", b"")), "empty.png: the uploaded file is empty"),
        "not an image": (upload(_write(root / "notes.txt", b"hello, not pixels\n" * 20)), "notes.txt: not an image"),
        "oversized": (upload(big), "above this app's limit of 1 megapixels"),
        "corrupt dicom": (upload(cut), "broken.dcm: truncated"),
        "dicom without image": (upload(nopix), "report.dcm: no Pixel Data"),
        "unknown vendor": (lambda c: generate(c, vendor="fuji"), "unknown vendor 'fuji'"),
        "empty free text": (lambda c: generate(c, source="free text"), "free-text prompt is empty"),
        "too many images": (lambda c: generate(c, n=4), "maximum value 3"),
        "bad box": (lambda c: inpaint_call(c, upload=root / "breast.png", box="9,9,1,1"), "x1 > x0"),
    }


def test_bad_inputs_give_messages_and_the_server_keeps_answering(app, files, downloads):
    client = Client(app.url, verbose=False, download_files=str(downloads))
    for name, (call, expected) in bad_cases(files).items():
        with pytest.raises(AppError) as info:
            call(client)
        assert expected in str(info.value), name
        assert str(files) not in str(info.value), f"{name}: the message shows a server path"
        gallery, _, _, _ = generate(client, seed=5, n=1)
        assert gray(gallery[0]["image"]).shape == (SIZE, SIZE), name
    with pytest.raises(AppError, match="no healthy image yet"):  # step 2 before step 1 in a new session
        client.predict(editor=editor(files / "breast.png", files / "layer.png"), box="", lesion_prompt="",
                       category="Mass", birads="", dicom=False, api_name="/full_inpaint", **SAMPLING)


# -------------------------------------------------------------------------------- one model only


def test_single_model_app_says_what_to_pass_and_requires_login(t2i_dir, monkeypatch, downloads):
    import gradio as gr

    monkeypatch.setenv("MAME_APP_USER", "reader")
    monkeypatch.setenv("MAME_APP_PASSWORD", "s3cret")
    running = start_app(text2image=t2i_dir)
    try:
        with pytest.raises(Exception):
            Client(running.url, verbose=False)
        client = Client(running.url, auth=("reader", "s3cret"), verbose=False, download_files=str(downloads))
        for call in (lambda: client.predict(api_name="/load_example"),
                     lambda: inpaint_call(client, box="1,1,9,9"),
                     lambda: client.predict(**ATTRS, **SAMPLING, seed=1, random_seed=False, api_name="/full_generate")):
            with pytest.raises(AppError, match="Start it with model.inpaint=EXPORT_DIR"):
                call()
        gallery, _, _, _ = generate(client, seed=1, n=1)
        assert len(gallery) == 1
        notes = " ".join(str(b.value) for b in running.blocks.blocks.values() if isinstance(b, gr.Markdown))
        assert h.MISSING_MODEL["inpaint"] in notes and h.MISSING_MODEL["text2image"] not in notes
    finally:
        running.close()


def test_handlers_without_a_text_to_image_model_say_what_to_pass(inpaint_model, tmp_path):
    import gradio as gr

    ctx = h.AppContext(None, inpaint_model, tmp_path)
    with pytest.raises(gr.Error, match="model.text2image=EXPORT_DIR"):
        h.generate(ctx, *ATTRS.values(), "", 4.0, 2, 0, False, 1, "dpmsolver++", False)
    with pytest.raises(gr.Error, match="model.text2image=EXPORT_DIR"):
        h.compose_prompt(ctx, *ATTRS.values())
