"""Loading exported models, prompts from attributes, seeded text-to-image, inpainting inputs and outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.generation import ATTRIBUTES, SIZE, breast_image, sidecar, tiny_export
from mame_lightning.pipelines.generation import (GenerationSettings, chunk_sizes, generators, inpaint, repaint_region,
                                                 text2image, to_gray_uint8)
from mame_lightning.pipelines.inputs import InputError, inpaint_mask, load_input_image, parse_box
from mame_lightning.pipelines.loading import SCHEDULERS, ModelNotFoundError, detect_task, load_model
from mame_lightning.pipelines.prompting import UnknownAttributeError, build_prompt, infer_view

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(steps=2, progress=False)


# ----------------------------------------------------------------------------------------- prompts


def test_attributes_fill_the_models_template_in_its_own_spelling():
    meta = sidecar("text2image")
    prompt = build_prompt(meta, attributes={"vendor": "Siemens", "view": "mlo", "density": "high", "area": "SMALL"})
    assert prompt == "a siemens mammogram in MLO view with high density and small area"
    # A BI-RADS letter means the same density word.
    assert build_prompt(meta, attributes={"vendor": "siemens", "view": "MLO", "density": "C", "area": "small"}) == prompt


def test_free_text_prompt_is_kept_and_cannot_be_mixed_with_attributes():
    meta = sidecar("text2image")
    assert build_prompt(meta, prompt="a mammogram, CC view") == "a mammogram, CC view"
    with pytest.raises(ValueError, match="not both"):
        build_prompt(meta, prompt="a mammogram", attributes={"view": "CC"})


@pytest.mark.parametrize("name, value, listed", [
    ("vendor", "fuji", ATTRIBUTES["vendors"]),
    ("view", "XCCL", ATTRIBUTES["views"]),
    ("density", "extreme", ATTRIBUTES["densities"]),
    ("area", "huge", ATTRIBUTES["areas"]),
])
def test_unknown_attribute_value_lists_what_the_model_knows(name, value, listed):
    with pytest.raises(UnknownAttributeError) as err:
        build_prompt(sidecar("text2image"), attributes={name: value})
    message = str(err.value)
    assert value in message and name in message
    assert all(repr(known) in message for known in listed)


def test_attribute_without_a_template_slot_is_refused():
    with pytest.raises(UnknownAttributeError, match="no \\{view\\} slot"):
        build_prompt(sidecar("inpaint"), "inpaint", attributes={"view": "CC"})


def test_view_is_read_from_the_attribute_or_the_prompt():
    assert infer_view("a siemens mammogram in mlo view") == "MLO"
    assert infer_view("a mammogram", {"view": "cc"}) == "CC"
    assert infer_view("a mammogram with a lesion") is None


# ----------------------------------------------------------------------------------------- loading


def test_task_comes_from_the_sidecar_or_the_unet_channels(models_root, tmp_path):
    for task in ("text2image", "inpaint"):
        copy = shutil.copytree(tiny_export(models_root, task), tmp_path / task)
        assert detect_task(copy, json.loads((copy / "mame_lightning.json").read_text())) == task
        (copy / "mame_lightning.json").unlink()
        assert detect_task(copy, {}) == task


def test_missing_model_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        load_model(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "mame_lightning.export" in str(err.value) and "mame_lightning.train" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="not an exported pipeline folder"):
        load_model(tmp_path)


def test_a_folder_written_by_the_exporter_loads_and_prompts_from_its_attributes(models_root, tmp_path):
    from types import SimpleNamespace

    from mame_lightning.models.components import load_components
    from mame_lightning.models.export import export_pipeline

    module = SimpleNamespace(components=load_components(str(tiny_export(models_root, "text2image"))), ema=None)
    folder = export_pipeline(module, tmp_path / "export", task="text2image",
                             templates={"text2image": "a mammogram in {view} view with {area} area"},
                             attributes={"views": ["CC", "MLO"], "areas": ["small", "big"]}, prepare_size=SIZE)
    model = load_model(folder, device="cpu")
    assert model.task == "text2image" and model.size == SIZE
    assert build_prompt(model.metadata, attributes={"view": "cc", "area": "big"}) == "a mammogram in CC view with big area"
    with pytest.raises(UnknownAttributeError, match="no \\{vendor\\} slot"):
        build_prompt(model.metadata, attributes={"vendor": "siemens"})
    assert text2image(model, "a mammogram", 1, GenerationSettings(**FAST))[0].image.shape == (SIZE, SIZE)


def test_checkpoint_is_exported_then_loaded(models_root, tmp_path, monkeypatch):
    import mame_lightning.models.export as export

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not used")
    calls = []

    def fake_export(path, out=None, config=None):
        calls.append(path)
        return shutil.copytree(tiny_export(models_root, "text2image"), out)

    monkeypatch.setattr(export, "export_checkpoint", fake_export)
    model = load_model(ckpt, device="cpu")
    assert calls == [ckpt] and model.task == "text2image" and model.path == str(ckpt)
    assert text2image(model, "a mammogram", 1, GenerationSettings(**FAST))[0].image.shape == (SIZE, SIZE)


def test_scheduler_by_name(t2i_model):
    try:
        for name, (class_name, _) in SCHEDULERS.items():
            t2i_model.set_scheduler(name)
            assert type(t2i_model.pipe.scheduler).__name__ == class_name
        t2i_model.set_scheduler("dpmsolver++")
        assert t2i_model.pipe.scheduler.config.algorithm_type == "dpmsolver++"
        # Another sampler really samples differently from the same starting noise.
        dpm = text2image(t2i_model, "a mammogram", 1, GenerationSettings(**FAST))[0].image
        t2i_model.set_scheduler("euler_a")
        euler = text2image(t2i_model, "a mammogram", 1, GenerationSettings(**FAST))[0]
        assert euler.params["scheduler"] == "euler_a"
        assert _diff(euler.image, dpm) > 0.2
        with pytest.raises(ValueError) as err:
            t2i_model.set_scheduler("heun9")
        assert all(name in str(err.value) for name in SCHEDULERS)
    finally:
        t2i_model.set_scheduler("dpmsolver++")


# ----------------------------------------------------------------------------------------- sampling


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_seeds_reproduce_each_image_alone_and_differ_between_images(t2i_model):
    prompt = "a hologic mammogram in CC view with low density and big area"
    batch = text2image(t2i_model, prompt, 3, GenerationSettings(seed=5, batch_size=2, **FAST))
    assert [r.seed for r in batch] == [5, 6, 7]
    alone = text2image(t2i_model, prompt, 1, GenerationSettings(seed=7, **FAST))[0]
    assert alone.seed == 7
    assert np.abs(alone.image.astype(int) - batch[2].image).max() <= 1  # batched vs single matmuls
    again = text2image(t2i_model, prompt, 1, GenerationSettings(seed=5, **FAST))[0]
    assert np.abs(again.image.astype(int) - batch[0].image).max() <= 1
    assert _diff(batch[0].image, batch[1].image) > 2
    assert all(r.seconds > 0 for r in batch)


def test_first_image_comes_alone_then_full_batches():
    assert chunk_sizes(1, 4) == [1]
    assert chunk_sizes(4, 4) == [1, 3]
    assert chunk_sizes(10, 4) == [1, 4, 4, 1]
    assert chunk_sizes(3, 1) == [1, 1, 1]
    assert sum(chunk_sizes(37, 8)) == 37
    capped = GenerationSettings(batch_size=8, max_batch_pixels=4 * 64 * 64)
    assert capped.batch_for(64, 64) == 4 and capped.batch_for(512, 512) == 1 and capped.batch_for(32, 32) == 8


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_batched_images_equal_one_by_one_images(t2i_model, inpaint_model):
    prompt = "a siemens mammogram in MLO view with high density and small area"
    settings = dict(negative_prompt="white background", **FAST)
    batch = text2image(t2i_model, prompt, 5, GenerationSettings(seed=11, batch_size=4, **settings))  # calls of 1 and 4
    for result in batch:
        alone = text2image(t2i_model, prompt, 1, GenerationSettings(seed=result.seed, **settings))[0]
        assert _max_diff(alone.image, result.image) <= 1  # batched vs single matmuls
    image, mask = breast_image(), np.zeros((SIZE, SIZE), np.uint8)
    mask[16:40, 20:44] = 255
    painted = inpaint(inpaint_model, image, mask, "a mammogram with a lesion", 3, GenerationSettings(seed=2, batch_size=2, **FAST))
    for result in painted:
        alone = inpaint(inpaint_model, image, mask, "a mammogram with a lesion", 1, GenerationSettings(seed=result.seed, **FAST))[0]
        assert _max_diff(alone.image, result.image) <= 1
    assert _diff(painted[0].image[mask > 0], painted[1].image[mask > 0]) > 1


def test_cached_prompt_embeddings_draw_what_text_prompts_draw(t2i_model):
    prompt, negative = "a hologic mammogram in CC view", "white background"
    t2i_model.prompt_cache.clear()
    ours = text2image(t2i_model, prompt, 2, GenerationSettings(seed=4, batch_size=2, negative_prompt=negative, **FAST))
    assert len(t2i_model.prompt_cache) == 1
    again = text2image(t2i_model, prompt, 1, GenerationSettings(seed=4, negative_prompt=negative, **FAST))[0]
    assert len(t2i_model.prompt_cache) == 1  # reused, not encoded again
    with torch.inference_mode():
        out = t2i_model.pipe(prompt=[prompt] * 2, negative_prompt=[negative] * 2, num_inference_steps=2, guidance_scale=4.0,
                             generator=generators([4, 5]), height=SIZE, width=SIZE, output_type="np")
    stock = to_gray_uint8(out.images)
    assert max(_max_diff(a, r.image) for a, r in zip(stock, ours)) <= 1
    assert _max_diff(again.image, stock[0]) <= 1
    other = text2image(t2i_model, "a siemens mammogram in MLO view", 1, GenerationSettings(seed=4, negative_prompt=negative, **FAST))
    assert len(t2i_model.prompt_cache) == 2 and _diff(other[0].image, again.image) > 0.2


def test_negative_prompt_and_guidance_change_the_output(t2i_model):
    prompt = "a siemens mammogram in MLO view"
    plain = text2image(t2i_model, prompt, 1, GenerationSettings(seed=3, **FAST))[0].image
    negative = text2image(t2i_model, prompt, 1, GenerationSettings(seed=3, negative_prompt="white background", **FAST))[0]
    assert negative.params["negative_prompt"] == "white background"
    # Identical settings reproduce exactly (see above); the tiny random model reacts weakly to text.
    assert _diff(plain, negative.image) > 0.2
    weak = text2image(t2i_model, prompt, 1, GenerationSettings(seed=3, guidance=1.5, **FAST))[0].image
    assert _diff(plain, weak) > 0.2


# ----------------------------------------------------------------------------------------- inpainting


def test_inpainting_changes_only_the_masked_region(inpaint_model):
    image = breast_image()
    mask = np.zeros_like(image)
    mask[20:36, 12:28] = 255
    settings = GenerationSettings(seed=0, **FAST)
    kept = inpaint(inpaint_model, image, mask, "a mammogram with a lesion", 2, settings)
    region = repaint_region(mask, inpaint_model.vae_scale_factor)
    for result in kept:
        assert _diff(result.image[~region], image[~region]) < 0.5
        assert _diff(result.image[mask > 0], image[mask > 0]) > 2
    # Without the paste-back the VAE round trip alters the whole image: the paste is what keeps it.
    raw = inpaint(inpaint_model, image, mask, "a mammogram with a lesion", 1, settings, keep_unmasked=False)[0]
    assert _diff(raw.image[~region], image[~region]) > 0.5
    with pytest.raises(ValueError, match="empty"):
        inpaint(inpaint_model, image, np.zeros_like(mask), "a lesion", 1, settings)


def test_wrong_task_is_refused(t2i_model, inpaint_model):
    with pytest.raises(ValueError, match="inpaint"):
        inpaint(t2i_model, breast_image(), np.full((SIZE, SIZE), 255, np.uint8), "x", 1)
    with pytest.raises(ValueError, match="text2image"):
        text2image(inpaint_model, "x", 1)


def _dicom_with_bright_box(path, box, laterality):
    """A 120x100 (rows x cols) DICOM, dark except a bright rectangle at `box` (original pixels)."""
    from mame_lightning.data.dicom_writer import make_mammogram_dataset, save_dataset

    pixels = np.full((120, 100), 300, np.uint16)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 4000
    save_dataset(make_mammogram_dataset(pixels, laterality=laterality, view="MLO"), path)


@pytest.mark.parametrize("laterality", ["R", "L"])
def test_box_in_original_dicom_pixels_maps_onto_the_prepared_image(tmp_path, laterality):
    box = (10, 30, 40, 70)  # left part of the original image
    path = tmp_path / "input.dcm"
    _dicom_with_bright_box(path, box, laterality)
    prepared = load_input_image(path, SIZE)
    assert prepared.image.shape == (SIZE, SIZE) and prepared.geometry.flip == (laterality == "R")
    mask = inpaint_mask(prepared, box=",".join(map(str, box))) > 0
    bright = prepared.image > 127
    overlap = (mask & bright).sum() / (mask | bright).sum()
    assert overlap > 0.8
    cols = np.nonzero(mask.any(axis=0))[0]
    # Right breasts are flipped: the box moves to the right half.
    assert (cols.min() > SIZE / 2) if laterality == "R" else (cols.max() < SIZE / 2)


def test_prepared_size_png_is_used_as_is_and_masks_follow_its_pixels(tmp_path):
    image = breast_image()
    Image.fromarray(image).save(tmp_path / "in.png")
    prepared = load_input_image(tmp_path / "in.png", SIZE)
    assert prepared.geometry is None and np.array_equal(prepared.image, image)
    mask = inpaint_mask(prepared, box=[4, 8, 12, 20])
    assert mask.sum() // 255 == 8 * 12 and mask[8:20, 4:12].all()
    big = np.zeros((2 * SIZE, 3 * SIZE), np.uint8)
    big[:, : SIZE] = 200
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(big).save(tmp_path / "big_mask.png")
    prepared_big = load_input_image(tmp_path / "big.png", SIZE)
    mask_big = inpaint_mask(prepared_big, mask=tmp_path / "big_mask.png")
    assert np.array_equal(mask_big > 0, prepared_big.image > 127)


def test_bad_inpainting_inputs_name_the_problem(tmp_path):
    Image.fromarray(breast_image()).save(tmp_path / "in.png")
    prepared = load_input_image(tmp_path / "in.png", SIZE)
    with pytest.raises(InputError, match="x1 > x0"):
        parse_box("30,10,20,40")
    with pytest.raises(InputError, match="four numbers"):
        parse_box("1,2,3")
    with pytest.raises(InputError, match="exactly one"):
        inpaint_mask(prepared)
    with pytest.raises(InputError, match="outside"):
        inpaint_mask(prepared, box="100,100,120,120")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(InputError, match="odd.png"):
        inpaint_mask(prepared, mask=tmp_path / "odd.png")
    with pytest.raises(InputError, match="missing.png"):
        load_input_image(tmp_path / "missing.png", SIZE)
