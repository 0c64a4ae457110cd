"""trainer=fsdp on CUDA GPUs: Lightning's FSDPStrategy (it refuses the CPU), checkpoint read by export."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from helpers.training import prepare_small_synthetic, run_train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="trainer=fsdp needs CUDA GPUs (Lightning's FSDPStrategy refuses the CPU)")]


def test_fsdp_run_writes_a_full_checkpoint_that_export_turns_into_a_pipeline(tmp_path):
    from mame_lightning.models.export import export_checkpoint

    root = tmp_path / "root"
    prepared = prepare_small_synthetic(root)
    run_dir = tmp_path / "fsdp"
    devices = min(2, torch.cuda.device_count())
    run_train(root, prepared, ["trainer=fsdp", f"trainer.devices={devices}", "trainer.max_steps=2",
                               "callbacks.sample_grid=null", "trainer.gradient_clip_val=null",
                               f"hydra.run.dir={run_dir}"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["global_step"] == 2 and result["world_size"] == devices and "export_dir" not in result
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not any("_fsdp_wrapped_module" in k or "flat_param" in k for k in state), "a full, unsharded state dict"

    export = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(export, safety_checker=None)
    unet = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(unet[k].float(), state[k].float()) for k in unet if k in state)
    image = pipe("a mammogram in CC view", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0
