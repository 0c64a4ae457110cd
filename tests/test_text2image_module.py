"""Text2ImageModule: what trains and what stays frozen, the loss paths, resumable randomness,
non-finite handling, accumulation, optimizers and precision, on a tiny model on CPU."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import bitsandbytes
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.training_utils import compute_snr
from helpers.modules import adamw, collate, loader, same_weights, tiny, toy_items, trainer, weights

import mame_lightning
from mame_lightning.models import diffusion
from mame_lightning.models.optimization import lr_schedule
from mame_lightning.models.text2image import Text2ImageModule, step_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def module(cache, **options):
    components = tiny(cache, frozen_dtype=options.pop("frozen_dtype", None),
                      train_text_encoder=options.get("train_text_encoder", True))
    options.setdefault("optimizer", adamw())
    return Text2ImageModule(components, **options)


def fixed_loss(m, batch, seeds=range(4)) -> float:
    with torch.no_grad():
        return sum(m.compute_loss(batch, step_generator(99, s, 0, 0, "cpu"), 0.0).item() for s in seeds) / len(seeds)


def test_training_changes_unet_and_text_encoder_but_not_the_vae(model_cache):
    m = module(model_cache, ema={"decay": 0.9})
    vae, unet, text = weights(m.vae), weights(m.unet), weights(m.text_encoder)
    fit = trainer(max_steps=3, log_every_n_steps=1)
    fit.fit(m, loader(toy_items(m.components)))
    assert fit.global_step == 3
    assert same_weights(vae, weights(m.vae))
    assert not same_weights(unet, weights(m.unet))
    assert not same_weights(text, weights(m.text_encoder))
    assert not m.vae.training and m.unet.training and m.text_encoder.training
    assert not any(p.requires_grad for p in m.vae.parameters())
    assert m.ema.optimization_step == 3
    assert "train/loss" in fit.callback_metrics and "train/lr" in fit.callback_metrics


def test_frozen_text_encoder_stays_unchanged_and_out_of_the_optimizer(model_cache):
    m = module(model_cache, train_text_encoder=False)
    text = weights(m.text_encoder)
    fit = trainer(max_steps=2)
    fit.fit(m, loader(toy_items(m.components)))
    assert same_weights(text, weights(m.text_encoder))
    assert not m.text_encoder.training
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in m.unet.parameters()}


def test_vae_stays_in_eval_mode_when_lightning_switches_to_train(model_cache):
    m = module(model_cache)
    m.eval()
    m.train()
    assert m.unet.training and not m.vae.training


def test_loss_goes_down_when_overfitting_four_images(model_cache):
    m = module(model_cache, prompt_dropout=0.0, optimizer=adamw(1e-3))
    items = toy_items(m.components)
    batch = collate(items)
    before = fixed_loss(m, batch)
    trainer(max_steps=30).fit(m, loader(items, batch_size=4))
    after = fixed_loss(m, batch)
    assert after < 0.6 * before, (before, after)


def spy(monkeypatch, name: str, record: dict):
    """Wrap diffusion.<name> to record what it returned (the module calls it through the module)."""
    original = getattr(diffusion, name)

    def wrapper(*args, **kwargs):
        record[name] = out = original(*args, **kwargs)
        return out

    monkeypatch.setattr(diffusion, name, wrapper)


def capture_unet_output(m, record: dict):
    return m.unet.register_forward_hook(lambda mod, args, kwargs, out: record.update(pred=out.sample),
                                        with_kwargs=True)


def test_v_prediction_loss_uses_the_velocity(model_cache, monkeypatch):
    m = module(model_cache)
    m.noise_scheduler = DDPMScheduler.from_config(m.noise_scheduler.config, prediction_type="v_prediction")
    batch = collate(toy_items(m.components))
    record = {}
    for name in ("sample_noise", "sample_timesteps", "latents_from_dist", "encode_latents"):
        spy(monkeypatch, name, record)
    capture_unet_output(m, record)
    with torch.no_grad():
        loss = m.compute_loss(batch, step_generator(0, 5, 0, 0, "cpu"), 0.0)
    latents = record["encode_latents"].float()
    velocity = m.noise_scheduler.get_velocity(latents, record["sample_noise"], record["sample_timesteps"])
    assert loss.item() == pytest.approx(F.mse_loss(record["pred"], velocity).item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.mse_loss(record["pred"], record["sample_noise"]).item(), rel=1e-3)


def test_snr_gamma_weights_each_sample(model_cache, monkeypatch):
    m = module(model_cache, snr_gamma=0.1)  # small enough that min(SNR, γ) clips most timesteps
    batch = collate(toy_items(m.components))
    record = {}
    for name in ("sample_noise", "sample_timesteps"):
        spy(monkeypatch, name, record)
    capture_unet_output(m, record)
    with torch.no_grad():
        loss = m.compute_loss(batch, step_generator(0, 1, 0, 0, "cpu"), 0.0)
    snr = compute_snr(m.noise_scheduler, record["sample_timesteps"])
    per_sample = ((record["pred"] - record["sample_noise"]) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * torch.clamp(snr, max=0.1) / snr).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(per_sample.mean().item(), rel=1e-3)


def test_noise_offset_shifts_each_channel_by_a_constant(model_cache, monkeypatch):
    batch = collate(toy_items(tiny(model_cache)))
    noises = []
    for offset in (0.0, 0.5):
        m = module(model_cache, noise_offset=offset)
        record = {}
        spy(monkeypatch, "sample_noise", record)
        with torch.no_grad():
            m.compute_loss(batch, step_generator(0, 3, 0, 0, "cpu"), 0.0)
        noises.append(record["sample_noise"])
        monkeypatch.undo()
    shift = noises[1] - noises[0]
    assert shift.abs().max() > 0.01
    assert torch.allclose(shift, shift.mean(dim=(2, 3), keepdim=True), atol=1e-6)


@pytest.mark.parametrize("frozen_dtype", [None, "float16"])
def test_cached_latents_give_the_same_loss_as_pixels(model_cache, frozen_dtype):
    m = module(model_cache, frozen_dtype=frozen_dtype)
    pixel_batch = collate(toy_items(m.components))
    with torch.no_grad():
        dist = m.vae.encode(pixel_batch["pixel_values"].to(m.vae.dtype)).latent_dist  # the cache's dtype
    cached = {"latent_mean": dist.mean, "latent_logvar": dist.logvar, "input_ids": pixel_batch["input_ids"]}
    for step in (0, 7):
        with torch.no_grad():
            a = m.compute_loss(pixel_batch, step_generator(3, step, 1, 0, "cpu"), 0.5)
            b = m.compute_loss(cached, step_generator(3, step, 1, 0, "cpu"), 0.5)
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)


def test_randomness_depends_on_seed_step_batch_and_rank_only(model_cache):
    m = module(model_cache)
    batch = collate(toy_items(m.components))

    def loss(*key):
        torch.manual_seed(len(key) * 1000 + sum(key))  # the global RNG must not matter
        with torch.no_grad():
            return m.compute_loss(batch, step_generator(*key, "cpu"), 0.5).item()

    assert loss(0, 4, 1, 0) == loss(0, 4, 1, 0)
    assert len({loss(0, 4, 1, 0), loss(0, 5, 1, 0), loss(0, 4, 0, 0), loss(0, 4, 1, 1), loss(1, 4, 1, 0)}) == 5


def test_resumed_run_matches_an_uninterrupted_one(model_cache, tmp_path):
    # One batch per epoch: the data order cannot differ, only the module's own state and draws.
    data = loader(toy_items(tiny(model_cache)), batch_size=4)
    straight = module(model_cache, ema={"decay": 0.9})
    trainer(max_steps=4).fit(straight, data)

    first = module(model_cache, ema={"decay": 0.9})
    half = trainer(max_steps=2)
    half.fit(first, data)
    half.save_checkpoint(tmp_path / "half.ckpt")
    resumed = module(model_cache, ema={"decay": 0.9})
    trainer(max_steps=4).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")

    assert same_weights(weights(straight.unet), weights(resumed.unet))
    assert same_weights(weights(straight.text_encoder), weights(resumed.text_encoder))
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params))


def nan_items(components, which: list[int]) -> list[dict]:
    items = toy_items(components)
    for i in which:
        items[i]["pixel_values"] = torch.full_like(items[i]["pixel_values"], float("nan"))
    return items


def test_nonfinite_loss_stops_with_the_step_in_the_message(model_cache):
    m = module(model_cache, nonfinite="stop")
    with pytest.raises(RuntimeError, match=r"global step 1 .*bf16-mixed"):
        trainer(max_steps=4).fit(m, loader(nan_items(m.components, [2, 3])))


def test_nonfinite_loss_with_skip_skips_and_counts(model_cache):
    m = module(model_cache, nonfinite="skip")
    fit = trainer(max_steps=4)
    fit.fit(m, loader(nan_items(m.components, [2, 3])))
    assert fit.global_step == 4
    assert m.skipped_steps == 2
    assert fit.callback_metrics["train/skipped_steps"].item() == 2
    assert all(torch.isfinite(p).all() for p in m.unet.parameters())


class CountingAdamW(torch.optim.AdamW):
    calls = 0

    def step(self, closure=None):
        CountingAdamW.calls += 1
        return super().step(closure)


def test_gradient_accumulation_steps_once_per_accumulated_batches(model_cache):
    CountingAdamW.calls = 0
    micro_batches = []
    m = module(model_cache, optimizer=lambda params: CountingAdamW(params, lr=1e-3))
    m.on_train_batch_start = lambda batch, batch_idx: micro_batches.append(batch_idx)
    fit = trainer(max_steps=3, accumulate_grad_batches=2)
    fit.fit(m, loader(toy_items(m.components), batch_size=1))
    assert len(micro_batches) == 6
    assert CountingAdamW.calls == fit.global_step == len(micro_batches) // 2


def test_lr_warms_up_per_optimizer_step(model_cache):
    warmup = functools.partial(lr_schedule, name="constant_with_warmup", num_warmup_steps=4)
    m = module(model_cache, optimizer=adamw(1e-3), lr_scheduler=warmup)
    fit = trainer(max_steps=2)
    fit.fit(m, loader(toy_items(m.components)))
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 4)


def test_adamw_8bit_runs_a_step_on_cpu(model_cache):
    m = module(model_cache, optimizer=lambda params: bitsandbytes.optim.AdamW8bit(params, lr=1e-3))
    unet = weights(m.unet)
    trainer(max_steps=1).fit(m, loader(toy_items(m.components)))
    assert not same_weights(unet, weights(m.unet))


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_bf16_mixed_keeps_fp32_trainable_weights_and_an_fp16_vae(model_cache, train_text_encoder):
    m = module(model_cache, frozen_dtype="float16", train_text_encoder=train_text_encoder)
    vae = weights(m.vae)
    fit = trainer(max_steps=2, precision="bf16-mixed")
    fit.fit(m, loader(toy_items(m.components)))
    assert fit.global_step == 2
    assert all(p.dtype == torch.float32 for p in m.unet.parameters())
    assert all(p.dtype == torch.float16 for p in m.vae.parameters())
    text_dtype = torch.float32 if train_text_encoder else torch.float16
    assert all(p.dtype == text_dtype for p in m.text_encoder.parameters())
    assert same_weights(vae, weights(m.vae))
    assert torch.isfinite(fit.callback_metrics["train/loss"])


def test_fp16_trainable_weights_are_refused_with_a_clear_error(model_cache):
    m = module(model_cache)
    m.unet.half()
    with pytest.raises(TypeError, match="fp32 master weights"):
        trainer(max_steps=1).fit(m, loader(toy_items(m.components)))


def test_gradient_checkpointing_and_attention_backends(model_cache):
    m = module(model_cache, gradient_checkpointing=True, attention_backend="default")
    assert m.unet.is_gradient_checkpointing
    assert m.text_encoder.is_gradient_checkpointing
    assert all(isinstance(p, AttnProcessor) for p in m.unet.attn_processors.values())
    unet = weights(m.unet)
    trainer(max_steps=1).fit(m, loader(toy_items(m.components)))
    assert not same_weights(unet, weights(m.unet))
    sdpa = module(model_cache)
    assert all(isinstance(p, AttnProcessor2_0) for p in sdpa.unet.attn_processors.values())


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_the_package_says_how_to_install_it(model_cache):
    with pytest.raises(ImportError, match=r"pip install mame_lightning\[gpu\]"):
        module(model_cache, attention_backend="xformers")


def test_bad_options_are_refused(model_cache):
    with pytest.raises(ValueError, match="nonfinite"):
        module(model_cache, nonfinite="ignore")
    with pytest.raises(ValueError, match="attention_backend"):
        module(model_cache, attention_backend="flash")
    with pytest.raises(ValueError, match="nothing to train"):
        module(model_cache, train_unet=False, train_text_encoder=False)
    with pytest.raises(ValueError, match="task=inpaint"):
        Text2ImageModule(tiny(model_cache, inpaint=True), adamw())


def test_prior_preservation_adds_the_weighted_prior_loss(model_cache):
    m = module(model_cache, prior_loss_weight=0.5)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([10, 200, 500, 900])
    prior = torch.tensor([False, True, False, True])
    expected = F.mse_loss(pred[~prior], target[~prior]) + 0.5 * F.mse_loss(pred[prior], target[prior])
    assert m.weighted_loss(pred, target, t, prior).item() == pytest.approx(expected.item(), rel=1e-6)
    assert m.weighted_loss(pred, target, t, None).item() == pytest.approx(F.mse_loss(pred, target).item())


def test_validation_logs_a_deterministic_loss(model_cache):
    m = module(model_cache)
    items = toy_items(m.components)
    fit = trainer(max_steps=1)
    first = fit.validate(m, loader(items), verbose=False)[0]["val/loss"]
    second = fit.validate(m, loader(items), verbose=False)[0]["val/loss"]
    assert first == second and first > 0


def test_checkpoint_keeps_hyperparameters_and_ema(model_cache, tmp_path):
    m = module(model_cache, ema={"decay": 0.9}, snr_gamma=5.0)
    fit = trainer(max_steps=1)
    fit.fit(m, loader(toy_items(m.components)))
    fit.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["snr_gamma"] == 5.0
    assert "components" not in state["hyper_parameters"] and "optimizer" not in state["hyper_parameters"]
    assert state["ema"]["optimization_step"] == 1


@pytest.mark.parametrize(("task", "overrides", "expected"), [
    ("text2image", ["task.module.ema={decay: 0.99}"], "Text2ImageModule"),
    ("inpaint", ["model.inpaint=true"], "InpaintModule"),
    ("autoencoder", [], "AutoencoderModule"),
])
def test_task_configs_build_their_modules(mame_root, task, overrides, expected):
    from hydra import compose, initialize_config_dir

    import mame_lightning
    from mame_lightning.models.building import build_components, build_module

    conf = Path(mame_lightning.__file__).parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", "model=tiny", "model.sample_size=32", *overrides])
    built = build_module(cfg, build_components(cfg))
    assert type(built).__name__ == expected
    assert built.hparams.seed == cfg.seed
    assert built.configure_optimizers()["lr_scheduler"]["interval"] == "step"


def lr_scheduler(optimizer, name, warmup, max_steps):
    """The conf/lr_scheduler group's option `name` with its warmup, for a run of max_steps."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(Path(mame_lightning.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"lr_scheduler={name}", f"lr_scheduler.num_warmup_steps={warmup}",
                                          f"trainer.max_steps={max_steps}"])
    return instantiate(cfg.lr_scheduler)(optimizer=optimizer)


def test_cosine_schedule_decays_to_zero_at_max_steps(mame_root):
    def lrs(name, warmup):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = lr_scheduler(optimizer, name, warmup, 100)
        values = []
        for _ in range(100):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return values

    cosine = lrs("cosine", 10)
    assert cosine[0] == 0 and cosine[10] == pytest.approx(1.0) and cosine[-1] < 0.01
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    assert set(lrs("constant", 0)) == {1.0}
    with pytest.raises(ValueError, match="max_steps"):
        lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "cosine", 0, -1)
    with pytest.raises(ValueError, match="lr_scheduler.name must be one of"):
        lr_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "step", 0, 10)
