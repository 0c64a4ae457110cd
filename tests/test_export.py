"""export_pipeline: a folder diffusers loads unmodified, fp32 and EMA weights, the sidecar, atomicity."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from helpers.modules import PROMPTS, SIZE, adamw, loader, tiny, toy_items, trainer
from PIL import Image

from mame_lightning.models.export import METADATA_FILE, export_pipeline, read_export_metadata
from mame_lightning.models.inpaint import InpaintModule
from mame_lightning.models.text2image import Text2ImageModule

pytestmark = pytest.mark.usefixtures("one_thread")

SIDECAR = {
    "templates": {"text2image": "a mammogram in {view} view with {area} area"},
    "attributes": {"views": ["CC", "MLO"], "areas": ["small", "big"]},
    "train_config": {"optimizer": {"lr": 1e-4}, "seed": 0},
    "data_counts": {"train": 4, "val": 0},
    "prepare_size": 512,
}


def test_text2image_export_loads_in_diffusers_and_generates(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache, frozen_dtype="float16"), adamw())
    trainer(max_steps=1).fit(m, loader(toy_items(m.components)))
    folder = export_pipeline(m, tmp_path / "model", task="text2image", **SIDECAR)

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        exported, live = getattr(pipe, name).state_dict(), getattr(m, name).state_dict()
        assert all(v.dtype == torch.float32 for v in exported.values()), name
        assert all(torch.equal(exported[k], live[k].float()) for k in live), name
    assert m.vae.dtype == torch.float16  # the live frozen VAE went back to its dtype ...
    conv = next(w for w in m.vae.parameters() if w.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # ... and kept its layout (vae_channels_last)

    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (SIZE, SIZE)
    assert np.asarray(image).std() > 0



def test_export_after_fit_writes_the_pipeline_folder(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache), adamw())
    trainer(max_steps=1).fit(m, loader(toy_items(m.components)))
    export_pipeline(m, tmp_path / "export", templates={"text2image": "a mammogram"}, prepare_size=32)
    assert (tmp_path / "export" / "unet").is_dir()
    meta = read_export_metadata(tmp_path / "export")
    assert meta["task"] == "text2image" and meta["prepare_size"] == 32

def test_export_writes_the_ema_weights_and_keeps_training_weights(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache), adamw(), ema={"decay": 0.5})
    trainer(max_steps=2).fit(m, loader(toy_items(m.components)))
    raw = {k: v.clone() for k, v in m.unet.state_dict().items()}
    export_pipeline(m, tmp_path / "model", task="text2image")
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "model").unet
    shadow = dict(zip([n for n, _ in m.unet.named_parameters()], m.ema.shadow_params))
    assert all(torch.equal(p, shadow[n]) for n, p in exported.named_parameters())
    assert any(not torch.equal(shadow[n], raw[n]) for n in shadow)
    assert all(torch.equal(v, raw[k]) for k, v in m.unet.state_dict().items())
    assert read_export_metadata(tmp_path / "model")["ema_weights"] is True


def test_inpaint_export_loads_in_the_inpainting_pipeline(model_cache, tmp_path):
    m = InpaintModule(tiny(model_cache, inpaint=True), adamw())
    folder = export_pipeline(m, tmp_path / "inpaint", **SIDECAR)
    assert read_export_metadata(folder)["task"] == "inpaint"
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (SIZE, SIZE), (90, 90, 90))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 20, 20))
    out = pipe("a mammogram", image=image, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert out.size == (SIZE, SIZE)


def test_sidecar_round_trips(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache), adamw())
    folder = export_pipeline(m, tmp_path / "model", task="text2image", **SIDECAR)
    assert (folder / "model_index.json").is_file() and (folder / METADATA_FILE).is_file()
    meta = read_export_metadata(folder)
    assert meta["task"] == "text2image"
    assert meta["templates"] == SIDECAR["templates"]
    assert meta["attributes"] == {"views": ["CC", "MLO"], "densities": [], "areas": ["small", "big"], "vendors": []}
    assert meta["train_config"] == SIDECAR["train_config"]
    assert meta["data_counts"] == SIDECAR["data_counts"]
    assert meta["prepare_size"] == 512
    assert datetime.fromisoformat(meta["created"]).tzinfo is not None


def test_export_replaces_a_previous_export_and_leaves_no_temporaries(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache), adamw())
    export_pipeline(m, tmp_path / "model", task="text2image", prepare_size=1)
    export_pipeline(m, tmp_path / "model", task="text2image", prepare_size=2)
    assert read_export_metadata(tmp_path / "model")["prepare_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_refuses_to_overwrite_a_folder_that_is_not_an_export(model_cache, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    m = Text2ImageModule(tiny(model_cache), adamw())
    with pytest.raises(FileExistsError, match="not a diffusers export"):
        export_pipeline(m, tmp_path / "notes", task="text2image")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_export_checks_the_task_against_the_unet(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache), adamw())
    with pytest.raises(ValueError, match="task=inpaint"):
        export_pipeline(m, tmp_path / "model", task="inpaint")


def test_reading_metadata_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=METADATA_FILE):
        read_export_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_export_metadata(tmp_path)
