"""The headline command `python -m mame_lightning.train dataset=<real> task=<task>` composes MAM-E's
recipe; the synthetic default stays the tiny CPU model; any group or key still overrides; a CPU
machine gets a one-line error naming the override; a tiny SD stand-in trains through the recipe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mame_lightning.runs.training import CPU_OVERRIDE, HardwareError, check_hardware
from helpers.training import CONF_DIR

REAL_DATASETS = ("vindr", "omi_h", "fusion", "folder")
TASKS = ("text2image", "inpaint")
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # 3.4: the pretrained stable-diffusion-v1-5
SD_INPAINT = "stable-diffusion-v1-5/stable-diffusion-inpainting"  # 1.1, 3.5: an SD inpainting model

# The paper's numbers (Montoya del Ángel & Martí, MAM-E; section of the paper) and where they sit
# in the composed config. Every real dataset × task must carry them.
PAPER = [
    ("dataset.batch_size", 16, "3.7: a mini-batch size of 16"),
    ("trainer.accumulate_grad_batches", 16, "3.7: 16 gradient accumulation steps, batch 256"),
    ("trainer.precision", "16-mixed", "3.7: mixed precision using fp16"),
    ("optimizer._target_", "bitsandbytes.optim.AdamW8bit", "3.7: the 8-bit AdamW optimizer by bitsandbytes"),
    ("optimizer.lr", 1e-6, "3.4.1: learning rates 1e-6, 1e-5, 1e-4 explored"),
    ("lr_scheduler.name", "constant_with_warmup", "3.4.1: constant lr schedule"),
    ("lr_scheduler.num_warmup_steps", 0, "3.4.1: constant lr schedule"),
    ("optimizer.weight_decay", 1e-2, "3.4.1: Adam weight decay and epsilon not changed"),
    ("optimizer.eps", 1e-8, "3.4.1: Adam weight decay and epsilon not changed"),
    ("trainer.gradient_clip_val", 1.0, "3.4.1: gradient clipping"),
    ("datamodule.drop_last", True, "3.4.1: dropping the last incomplete batch"),
    ("task.module.gradient_checkpointing", True, "3.7: gradient checkpointing"),
    ("task.module.train_text_encoder", True, "3.4: train the CLIP text encoder and the UNet"),
    ("task.module.train_unet", True, "3.4: train the CLIP text encoder and the UNet"),
    ("datamodule.resolution", 512, "3.2: resized to a 512x512 square"),
    ("callbacks.sample_grid.num_inference_steps", 24, "4 (inference): 24 timesteps with DPM-solver"),
    ("callbacks.sample_grid.scheduler", "dpmsolver++", "3.4.2: the DPM-solver of Lu et al."),
    ("trainer.accelerator", "gpu", "3.7: one GPU of about 20 GB"),
]
PAPER_STEPS = (1000, 16000)  # 3.4.1: training steps ranged from 1k up to 16k
SAMPLE_EVERY = (100, 200)  # 3.4.1: 4 sample images every 100 or 200 training steps
STEPS = {("vindr", "text2image"): 10000, ("omi_h", "text2image"): 10000, ("fusion", "text2image"): 16000,
         ("folder", "text2image"): 10000, **{(d, "inpaint"): 15000 for d in REAL_DATASETS}}


def headline(tmp_path, *overrides):
    """The config `python -m mame_lightning.train <overrides>` composes."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"run_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("dataset", REAL_DATASETS)
@pytest.mark.parametrize("task", TASKS)
def test_headline_command_composes_the_papers_recipe(dataset, task, tmp_path):
    cfg = headline(tmp_path, f"dataset={dataset}", f"task={task}")
    for key, expected, source in PAPER:
        assert OmegaConf.select(cfg, key) == expected, f"{key}: paper {source}"
    assert cfg.dataset.batch_size * cfg.trainer.accumulate_grad_batches == 256
    assert cfg.model._target_ == "mame_lightning.models.components.load_components"
    assert cfg.model.path == cfg.model.pretrained == (SD_INPAINT if task == "inpaint" else SD15)
    assert PAPER_STEPS[0] <= cfg.trainer.max_steps <= PAPER_STEPS[1]
    assert cfg.trainer.max_steps == STEPS[dataset, task]
    grid = OmegaConf.to_container(cfg.callbacks.sample_grid, resolve=True)
    assert grid["every_n_steps"] in SAMPLE_EVERY
    assert len(grid["prompts"]) * len(grid["seeds"]) == 4, "3.4.1: 4 sample images"
    assert cfg.task.name == task and cfg.datamodule.task == task


def trained_prompts(template: str, densities: tuple = (None,)) -> set[str]:
    """Every prompt preparation writes with this template (data/prompts.py fills it from the
    image's attributes; an attribute the image lacks drops its phrase)."""
    from mame_lightning.data.prompts import render_prompt

    return {render_prompt(template, {"view": view, "area": area, "density": density, "vendor": vendor})
            for view in ("CC", "MLO") for area in ("small", "medium", "big")
            for density in densities for vendor in ("hologic", "siemens", None)}


@pytest.mark.parametrize("dataset", REAL_DATASETS + ("synthetic",))
def test_sample_grid_prompts_are_prompts_the_dataset_trains_on(dataset, tmp_path):
    cfg = headline(tmp_path, f"dataset={dataset}")
    templates = cfg.dataset.templates
    prompts = OmegaConf.to_container(cfg.callbacks.sample_grid.prompts, resolve=True)
    # VinDr images always have a density, OMI-H images never (so fusion's Hologic prompts have none)
    densities = {"vindr": ("very low", "low", "high", "very high"),
                 "fusion": (None, "very low", "low", "high", "very high")}.get(dataset, (None,))
    assert set(prompts) <= trained_prompts(templates.text2image, densities), templates.text2image
    assert len(set(prompts)) == len(prompts) == 2
    inpaint = headline(tmp_path, f"dataset={dataset}", "task=inpaint").callbacks.sample_grid
    assert OmegaConf.to_container(inpaint.prompts, resolve=True) == [templates.inpaint]


def test_synthetic_stays_the_tiny_cpu_model(tmp_path):
    cfg = headline(tmp_path)
    assert cfg.dataset.name == "synthetic" and cfg.model._target_.endswith("tiny_components")
    assert cfg.trainer.precision == "32-true" and cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.accumulate_grad_batches == 1
    assert cfg.datamodule.resolution == 64
    check_hardware(cfg, cuda_available=False)  # runs anywhere


def test_any_single_group_or_key_still_overrides(tmp_path):
    model_dir = tmp_path / "local_sd15"
    cpu = headline(tmp_path, "dataset=vindr", "trainer.accelerator=cpu", "precision=32-true")
    assert cpu.trainer.accelerator == "cpu" and cpu.trainer.precision == "32-true"
    assert cpu.optimizer._target_ == "bitsandbytes.optim.AdamW8bit"  # the rest of the recipe stays
    check_hardware(cpu, cuda_available=False)
    tiny = headline(tmp_path, "dataset=omi_h", "model=tiny")
    assert tiny.model._target_.endswith("tiny_components") and "pretrained" not in tiny.model
    torch_adamw = headline(tmp_path, "dataset=fusion", "optimizer=adamw", "trainer.max_steps=50")
    assert torch_adamw.optimizer._target_ == "torch.optim.AdamW" and torch_adamw.optimizer.lr == 1e-6
    assert torch_adamw.trainer.max_steps == 50
    local = headline(tmp_path, "dataset=vindr", "task=inpaint", f"model.pretrained={model_dir}")
    assert local.model.path == str(model_dir)


@pytest.mark.parametrize("name, dataset, task", [
    ("mame_hologic", "omi_h", "text2image"), ("mame_siemens", "vindr", "text2image"),
    ("mame_fusion", "fusion", "text2image"), ("mame_inpaint_vindr", "vindr", "inpaint"),
    ("mame_inpaint_omi", "omi_h", "inpaint")])
def test_named_experiments_are_the_dataset_task_recipes(name, dataset, task, tmp_path):
    by_name = OmegaConf.to_container(headline(tmp_path, f"experiment={name}"))
    assert by_name == OmegaConf.to_container(headline(tmp_path, f"dataset={dataset}", f"task={task}"))


def test_guidance_settings_reach_the_sample_grid(tmp_path):
    cfg = headline(tmp_path, "guidance.negative_prompt=white background", "guidance.scheduler=ddim")
    grid = instantiate(cfg.callbacks.sample_grid)
    assert grid.negative_prompt == "white background" and grid.scheduler == "ddim"


def test_hardware_check_names_the_cpu_override(tmp_path):
    cfg = headline(tmp_path, "dataset=vindr", "task=inpaint")
    with pytest.raises(HardwareError, match=re.escape(CPU_OVERRIDE)) as info:
        check_hardware(cfg, cuda_available=False)
    assert "\n" not in str(info.value) and "dataset=vindr task=inpaint" in str(info.value)
    check_hardware(cfg, cuda_available=True)
    fp16_on_cpu = headline(tmp_path, "dataset=vindr", "trainer.accelerator=cpu")
    with pytest.raises(HardwareError, match="precision=32-true"):
        check_hardware(fp16_on_cpu, cuda_available=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_headline_command_without_a_gpu_fails_in_one_line_before_loading_anything(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mame_lightning.train", "dataset=vindr", "task=inpaint",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MAME_ROOT": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and CPU_OVERRIDE in last
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "resolved_config.yaml").exists() and not (run_dir / "checkpoints").exists()


# --- the recipe end to end with a tiny stand-in for the SD weights ---------------------------------


@pytest.fixture(scope="module")
def vindr_prepared(tmp_path_factory):
    """A small VinDr-Mammo release (healthy and lesion images) prepared at 64 px."""
    from mame_lightning.data.prepare.preparation import prepare_dataset
    from helpers.preparation import compose_prepare, write_vindr

    root = tmp_path_factory.mktemp("recipe_vindr")
    write_vindr(root / "raw", [dict(image_id=f"h{i}", seed=i, view=("CC", "MLO")[i % 2]) for i in range(4)]
                + [dict(image_id=f"l{i}", seed=10 + i, lesions=("mass",)) for i in range(4)])
    prepare_dataset(compose_prepare("vindr", root / "raw", root / "prepared", "dataset.size=64"))
    return root / "prepared"


def stand_in(folder: Path, inpaint: bool) -> Path:
    """Tiny SD components saved with save_pretrained, as a local copy of the hub weights would be."""
    from mame_lightning.models.components import build_models

    tiny = OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")
    parts = build_models(words=tiny.words, unet=tiny.unet, vae=tiny.vae, text_encoder=tiny.text_encoder,
                         sample_size=64, in_channels=9 if inpaint else 4, seed=0)
    parts.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_the_recipe_trains_a_stand_in_for_the_sd_weights_and_exports(task, vindr_prepared, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from mame_lightning.runs.training import train

    weights = stand_in(tmp_path / "sd", inpaint=task == "inpaint")
    cfg = headline(tmp_path / "run", "dataset=vindr", f"task={task}", f"model.pretrained={weights}",
                   "trainer.accelerator=cpu", "precision=32-true", f"dataset.prepared_dir={vindr_prepared}",
                   "dataset.size=64", "trainer.max_steps=2", "dataset.batch_size=2",
                   "trainer.accumulate_grad_batches=2", "dataset.num_workers=0", "dataset.pin_memory=false",
                   "guidance.steps=2", "trainer.enable_progress_bar=false", f"paths.root={tmp_path}")
    assert cfg.optimizer._target_ == "bitsandbytes.optim.AdamW8bit" and cfg.task.module.gradient_checkpointing
    result = train(cfg)
    assert result["global_step"] == 2 and result["micro_batches"] == 4
    cls = StableDiffusionInpaintPipeline if task == "inpaint" else StableDiffusionPipeline
    before = cls.from_pretrained(weights, safety_checker=None)
    after = cls.from_pretrained(result["export_dir"], safety_checker=None)
    assert after.unet.config.in_channels == (9 if task == "inpaint" else 4)
    changed = [k for k, v in after.unet.state_dict().items() if not torch.equal(v, before.unet.state_dict()[k])]
    assert changed, "the recipe's optimizer moved the UNet"
    sidecar = json.loads((Path(result["export_dir"]) / "mame_lightning.json").read_text())
    assert sidecar["task"] == task
    samples = sorted((tmp_path / "run" / "tensorboard" / "samples").glob("step_*.png"))
    assert samples, "the sample grid was drawn with the dataset's prompts"
