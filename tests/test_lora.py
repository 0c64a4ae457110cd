"""LoRA fine-tuning (conf/lora/): only the peft adapters train, checkpoints hold only them and resume exactly,
and the export is what stock diffusers loads with `load_lora_weights` (or, merged, a plain pipeline)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from helpers.modules import SIZE, adamw, loader, same_weights, tiny, toy_items, trainer, weights
from omegaconf import OmegaConf

import mame_lightning
from mame_lightning.models.checkpoints import allowed_types, load_checkpoint
from mame_lightning.models.export import export_pipeline
from mame_lightning.models.inpaint import InpaintModule
from mame_lightning.models.lora import LORA_WEIGHTS, LoraStateError
from mame_lightning.models.text2image import Text2ImageModule
from mame_lightning.pipelines.loading import load_model
from mame_lightning.pipelines.stock import load_stock

pytestmark = pytest.mark.usefixtures("one_thread")

LORA_DIR = Path(mame_lightning.CONF_DIR) / "lora"


def lora_group(name: str, **changes) -> dict:
    """conf/lora/<name>.yaml as the training config composes it."""
    cfg = OmegaConf.load(LORA_DIR / f"{name}.yaml")
    if "defaults" in cfg:
        base = OmegaConf.load(LORA_DIR / f"{cfg.defaults[0]}.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    return {**OmegaConf.to_container(cfg), **changes}


def lora_module(cache, group="unet", inpaint=False, lr=1e-2, **options):
    components = tiny(cache, inpaint=inpaint, frozen_dtype=options.pop("frozen_dtype", None))
    cls = InpaintModule if inpaint else Text2ImageModule
    torch.manual_seed(0)  # peft draws the gaussian A matrices from the global generator (training seeds it first)
    return cls(components, optimizer=adamw(lr=lr), lora=lora_group(group, **options.pop("lora", {})), **options)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights peft wraps, under their plain names (what a stock pipeline folder holds)."""
    return {k.replace(".base_layer", ""): v for k, v in weights(module).items() if not is_adapter(k)}


def fit(module, steps: int, ckpt_path=None, inpaint=False):
    """Train `steps` steps on one batch of four (one batch per epoch: a resumed run sees the same data),
    resuming from `ckpt_path` as training does (weights_only=True, the allow-list)."""
    run = trainer(max_steps=steps)
    safe = {"weights_only": True} if "weights_only" in inspect.signature(L.Trainer.fit).parameters else {}
    with allowed_types():
        run.fit(module, loader(toy_items(module.components, inpaint=inpaint), batch_size=4), ckpt_path=ckpt_path,
                **safe)
    return run


def images(pipe, seed=0, size=SIZE, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe("a mammogram in cc view with big area", num_inference_steps=3, height=size, width=size,
                guidance_scale=3.0, generator=generator, output_type="np", **kwargs).images


@pytest.mark.parametrize("group", ["unet", "unet_text"])
def test_only_the_adapters_train_and_the_base_stays_bit_identical(model_cache, group):
    m = lora_module(model_cache, group, gradient_checkpointing=group == "unet_text")  # as the paper recipe
    trainable = {name for name, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(name) for name in trainable)
    assert {name.split(".", 1)[0] for name in trainable} == ({"unet"} if group == "unet" else {"unet", "text_encoder"})
    before = {part: weights(getattr(m, part)) for part in ("unet", "text_encoder", "vae")}
    run = fit(m, 3)
    optimised = {id(p) for group_ in run.optimizers[0].param_groups for p in group_["params"]}
    assert optimised == {id(p) for p in m.parameters() if p.requires_grad}, "the optimiser gets the adapters only"
    for part, old in before.items():
        new = weights(getattr(m, part))
        assert same_weights({k: v for k, v in old.items() if not is_adapter(k)},
                            {k: v for k, v in new.items() if not is_adapter(k)}), f"{part} base weights moved"
    moved = {k for k in before["unet"] if is_adapter(k) and not torch.equal(before["unet"][k], weights(m.unet)[k])}
    assert any(".lora_B." in k for k in moved), "the zero-initialised B matrices learn"
    text_moved = [k for k in before["text_encoder"] if is_adapter(k)
                  and not torch.equal(before["text_encoder"][k], weights(m.text_encoder)[k])]
    assert bool(text_moved) == (group == "unet_text")
    assert not m.text_encoder.training if group == "unet" else m.text_encoder.training


def test_half_precision_base_and_float32_adapters(model_cache):
    """bf16-mixed on the CPU stands for fp16 on a GPU: frozen weights in the low dtype, adapters fp32 masters."""
    m = lora_module(model_cache, "unet_text", frozen_dtype="bfloat16")
    for part in (m.unet, m.text_encoder):
        dtypes = {name: p.dtype for name, p in part.named_parameters()}
        assert {d for n, d in dtypes.items() if is_adapter(n)} == {torch.float32}
        assert {d for n, d in dtypes.items() if not is_adapter(n)} == {torch.bfloat16}
    run = trainer(max_steps=1, precision="bf16-mixed")
    run.fit(m, loader(toy_items(m.components), batch_size=2))
    assert run.global_step == 1 and torch.isfinite(run.callback_metrics["train/loss"])


def test_lora_checkpoint_is_small_holds_adapters_only_and_resumes_exactly(model_cache, tmp_path):
    straight = lora_module(model_cache, "unet_text")
    fit(straight, 4)

    first = lora_module(model_cache, "unet_text")
    half = fit(first, 2)
    half.save_checkpoint(tmp_path / "lora.ckpt")
    state = load_checkpoint(tmp_path / "lora.ckpt")  # weights_only=True with the allow-list
    assert state["state_dict"] and all(is_adapter(k) for k in state["state_dict"])
    assert state["lora"]["rank"] == 4 and state["lora"]["text_encoder"] == ["q_proj", "k_proj", "v_proj", "out_proj"]

    full = Text2ImageModule(tiny(model_cache), optimizer=adamw())
    fit(full, 1).save_checkpoint(tmp_path / "full.ckpt")
    lora_size, full_size = (tmp_path / "lora.ckpt").stat().st_size, (tmp_path / "full.ckpt").stat().st_size
    assert lora_size < full_size / 5, (lora_size, full_size)

    resumed = lora_module(model_cache, "unet_text")
    fit(resumed, 4, ckpt_path=tmp_path / "lora.ckpt")
    for part in ("unet", "text_encoder"):
        assert same_weights(weights(getattr(straight, part)), weights(getattr(resumed, part))), part

    with pytest.raises(LoraStateError, match="lora=unet_text"):  # a LoRA checkpoint cannot resume a full run
        fit(Text2ImageModule(tiny(model_cache), optimizer=adamw()), 3, ckpt_path=tmp_path / "lora.ckpt")
    with pytest.raises(LoraStateError, match="do not match"):  # nor a run with other target modules
        fit(lora_module(model_cache, "unet"), 3, ckpt_path=tmp_path / "lora.ckpt")
    with pytest.raises(LoraStateError, match="full model weights"):
        fit(lora_module(model_cache, "unet"), 3, ckpt_path=tmp_path / "full.ckpt")


@pytest.fixture(scope="module")
def trained(model_cache, tmp_path_factory):
    """A LoRA module (UNet + text encoder, alpha != rank) trained a few steps, and its base weights."""
    m = lora_module(model_cache, "unet_text", lr=5e-2, lora={"rank": 2, "alpha": 6})
    base = {part: base_weights(getattr(m, part)) for part in ("unet", "text_encoder")}
    fit(m, 4)
    out = tmp_path_factory.mktemp("lora_export")
    return m, base, export_pipeline(m, out / "export", task="text2image"), out


def test_export_is_the_base_pipeline_plus_a_lora_file_that_stock_diffusers_loads(trained):
    m, base, folder, _ = trained
    assert (folder / LORA_WEIGHTS).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for part in ("unet", "text_encoder"):
        assert same_weights(base[part], weights(getattr(pipe, part))), f"the exported {part} is the base model"
    before = images(pipe)
    pipe.load_lora_weights(folder)
    adapted = images(pipe)
    ids = m.tokenizer(["a mammogram in mlo view"], padding="max_length", max_length=m.tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    latents, timestep = torch.randn(1, 4, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(1)), 500
    with torch.no_grad():  # the loaded adapters compute what the trained ones do (rank 2 scaled by alpha 6)
        hidden, loaded_hidden = m.text_encoder(ids)[0], pipe.text_encoder(ids)[0]
        assert torch.allclose(hidden, loaded_hidden, atol=1e-5)
        assert torch.allclose(m.unet(latents, timestep, hidden).sample, pipe.unet(latents, timestep, hidden).sample,
                              atol=1e-5)
    assert float(abs(adapted - before).max()) > 1e-3, "the adapters change the images"

    assert abs(images(load_stock(folder, device="cpu").pipe) - adapted).max() <= 1e-5  # evaluate pipeline=stock
    ours = load_model(folder, device="cpu", dtype="fp32")  # what generate, evaluate and the app use
    pipe.scheduler = type(ours.pipe.scheduler).from_config(ours.pipe.scheduler.config)
    assert abs(images(ours.pipe) - images(pipe)).max() <= 1e-5

    sidecar = json.loads((folder / "mame_lightning.json").read_text())
    assert sidecar["lora"] == {"rank": 2, "alpha": 6.0, "dropout": 0.0, "unet": ["to_k", "to_q", "to_v", "to_out.0"],
                               "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"], "merged": False,
                               "weights": LORA_WEIGHTS}
    card = (folder / "README.md").read_text()
    assert "load_lora_weights" in card and "rank 2, alpha 6" in card
    # the live module is unchanged by the export: still adapted and trainable
    assert any(p.requires_grad for p in m.unet.parameters()) and hasattr(m.unet, "peft_config")


def test_merged_export_has_no_lora_file_and_gives_the_same_images(trained):
    m, _, folder, out = trained
    merged = export_pipeline(m, out / "merged", task="text2image", merge_lora=True)
    assert not (merged / LORA_WEIGHTS).exists()
    assert json.loads((merged / "mame_lightning.json").read_text())["lora"]["merged"] is True
    plain = StableDiffusionPipeline.from_pretrained(merged, safety_checker=None)
    assert not any(is_adapter(k) or "base_layer" in k for k in plain.unet.state_dict())
    adapted = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    adapted.load_lora_weights(folder)
    assert abs(images(plain) - images(adapted)).max() <= 2e-3


def test_inpainting_lora_trains_the_adapters_and_exports_for_the_inpainting_pipeline(model_cache, tmp_path):
    m = lora_module(model_cache, "unet", inpaint=True, conv_in_lr_scale=10.0)
    before = weights(m.unet)
    fit(m, 2, inpaint=True)
    after = weights(m.unet)
    assert all(torch.equal(before[k], after[k]) for k in before if not is_adapter(k))
    assert any(not torch.equal(before[k], after[k]) for k in before if ".lora_B." in k)
    folder = export_pipeline(m, tmp_path / "export", task="inpaint")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(folder)
    assert pipe.unet.config.in_channels == 9
    painted = images(pipe, image=torch.zeros(1, 3, SIZE, SIZE), mask_image=torch.ones(1, 1, SIZE, SIZE))
    assert painted.shape == (1, SIZE, SIZE, 3)


def test_bad_lora_options_name_the_key(model_cache):
    with pytest.raises(ValueError, match="lora.unet=.*no_such_layer"):
        lora_module(model_cache, "unet", lora={"unet": ["no_such_layer"]})
    with pytest.raises(ValueError, match="lora: unknown keys"):
        lora_module(model_cache, "unet", lora={"ranks": 3})
    with pytest.raises(ValueError, match="ema does not apply"):
        lora_module(model_cache, "unet", ema={"decay": 0.9})


@pytest.mark.slow
def test_lora_run_from_the_command_line_exports_adapters_and_resumes_exactly(small_prepared, tmp_path):
    """`python -m mame_lightning.train lora=unet lora.rank=8`: the export and the checkpoints hold the adapters;
    a run resumed from its step-2 checkpoint ends with the same adapters; the checkpoint exports merged."""
    from hydra.utils import instantiate
    from safetensors.torch import load_file

    from mame_lightning.models.export import export_checkpoint
    from mame_lightning.runs.training import train
    from helpers.training import compose_train, run_train

    root, prepared = small_prepared
    common = ["lora=unet", "lora.rank=8", "optimizer.lr=1e-2", "trainer.max_steps=4", "trainer.deterministic=true",
              "callbacks.sample_grid=null", "trainer.val_check_interval=100"]
    straight = tmp_path / "straight"
    run_train(root, prepared, [*common, f"hydra.run.dir={straight}"])
    export = straight / "export"
    sidecar = json.loads((export / "mame_lightning.json").read_text())
    assert sidecar["lora"]["rank"] == 8 and sidecar["lora"]["weights"] == LORA_WEIGHTS
    adapters = load_file(export / LORA_WEIGHTS)
    assert adapters and all(k.startswith("unet.") and "lora" in k for k in adapters)

    cfg = compose_train(tmp_path / "resumed", root, prepared,
                        [*common, f"ckpt_path={straight / 'checkpoints' / 'step-000002.ckpt'}"])
    base = instantiate(cfg.model)
    pipe = StableDiffusionPipeline.from_pretrained(export, safety_checker=None)
    assert same_weights(weights(base.unet), weights(pipe.unet)), "the exported UNet is the base model"

    last = straight / "checkpoints" / "last.ckpt"
    state = load_checkpoint(last)
    assert all(is_adapter(k) for k in state["state_dict"])
    full_weights = sum(f.stat().st_size for f in export.glob("*/diffusion_pytorch_model.safetensors"))
    full_weights += sum(f.stat().st_size for f in (export / "text_encoder").glob("*.safetensors"))
    assert last.stat().st_size < full_weights / 5, "a full checkpoint holds at least the UNet and text encoder"

    result = train(cfg)
    assert result["global_step"] == 4
    again = load_file(tmp_path / "resumed" / "export" / LORA_WEIGHTS)
    assert again.keys() == adapters.keys()
    worst = max(float((again[k] - adapters[k]).abs().max()) for k in adapters)
    assert worst <= 1e-6, f"resumed adapters differ from the uninterrupted run by {worst}"

    merged = export_checkpoint(last, tmp_path / "merged", merge_lora=True)  # python -m mame_lightning.export
    assert not (merged / LORA_WEIGHTS).exists()
    pipe.load_lora_weights(export)
    plain = StableDiffusionPipeline.from_pretrained(merged, safety_checker=None)
    assert abs(images(plain, size=64) - images(pipe, size=64)).max() <= 2e-3
