"""Text-to-image fine-tuning of Stable Diffusion as a thin LightningModule.

The diffusion maths (noise, timesteps, targets, losses, conditioning) lives in `diffusion.py`;
this module wires the components together, keeps the frozen parts frozen, and derives every
random draw of a step from (seed, global step, micro-batch index, rank) so that a run resumed
from a checkpoint draws exactly the numbers an uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import lightning as L
import torch
from mame_lightning.models import diffusion
from mame_lightning.models.acceleration import ATTENTION_BACKENDS, set_attention_backend, use_channels_last
from mame_lightning.models.ema import build_ema, ema_on_device, ema_step
from mame_lightning.models.loggers import logging_step
from mame_lightning.models.lora import (CHECKPOINT_KEY, adapter_state, add_lora, check_adapter_state,
                                        check_checkpoint_kind)
from mame_lightning.models.optimization import constant_schedule
from mame_lightning.models.reproducible import TRAIN_STREAM, VAL_STREAM, step_generator
from mame_lightning.models.text_embeddings import PromptEmbeddingCache

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")
NONFINITE_HINT = (
    "likely causes: a learning rate too high (lower optimizer.lr or add lr_scheduler.num_warmup_steps=N), "
    "fp16 overflow (try precision=bf16-mixed), or bad data (NaN/inf pixels or cached latents)"
)
# A skipped step is for a rare bad batch; this many in a row, or more than max_skipped_fraction of
# the steps (counted over at least FRACTION_WINDOW steps), means the run diverged: it stops.
FRACTION_WINDOW = 100


class TrainingDiverged(RuntimeError):
    """The loss went NaN/inf (nonfinite=stop) or too many steps were skipped (nonfinite=skip)."""


def plain_options(options: Mapping | None) -> dict | None:
    """A mapping from the config (an OmegaConf node) as a plain dict."""
    if options is None:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(options, resolve=True) if OmegaConf.is_config(options) else dict(options)


class Text2ImageModule(L.LightningModule):
    """Fine-tunes the UNet (and optionally the text encoder) on prompt-image pairs; with `lora` (the lora
    config group: rank, alpha, dropout, target modules per part) only adapters on them train."""

    task = "text2image"

    def __init__(
        self,
        components,
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        train_unet: bool = True,
        train_text_encoder: bool = True,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        prompt_dropout: float = 0.1,
        ema: Mapping | None = None,
        gradient_checkpointing: bool = False,
        attention_backend: str = "sdpa",
        prior_loss_weight: float = 1.0,
        nonfinite: str = "stop",
        max_skipped_fraction: float = 0.05,
        max_consecutive_skipped: int = 10,
        seed: int = 0,
        lora: Mapping | None = None,
        cache_text_embeddings: bool = True,
        channels_last: bool = False,
        vae_channels_last: bool = True,
    ):
        super().__init__()
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if not 0.0 <= max_skipped_fraction < 1.0 or int(max_consecutive_skipped) < 1:
            raise ValueError("max_skipped_fraction must be in [0, 1) and max_consecutive_skipped at least 1, got "
                             f"{max_skipped_fraction} and {max_consecutive_skipped}")
        if not (train_unet or train_text_encoder):
            raise ValueError("nothing to train: set train_unet or train_text_encoder to true")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        ema, lora = plain_options(ema), plain_options(lora)  # plain types: checkpoints load with weights_only=True
        self.save_hyperparameters(ignore=["components", "optimizer", "lr_scheduler"])
        self.components = components
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.noise_scheduler = components.noise_scheduler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler or constant_schedule
        self.check_unet_channels()
        self.lora = add_lora(components, lora)
        if self.lora is not None:  # the adapters decide what trains
            if ema:
                raise ValueError("task.module.ema does not apply to LoRA training (lora=none to keep an average)")
            self.hparams.train_unet = "unet" in self.lora.parts
            self.hparams.train_text_encoder = "text_encoder" in self.lora.parts
        self.freeze_frozen_parts()
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()
        set_attention_backend(self.unet, attention_backend)
        self.setup_speed(channels_last, vae_channels_last, cache_text_embeddings)
        self.ema = build_ema(self.unet, ema) if self.hparams.train_unet else None
        self.skipped_steps = 0  # micro-batches skipped for a non-finite loss (nonfinite=skip)
        self.attempted_steps = 0  # micro-batches trained on or skipped
        self.consecutive_skipped = 0
        self._ema_last_step: int | None = None
        self._micro_step: int | None = None
        self._micro_index = 0

    def setup_speed(self, channels_last: bool, vae_channels_last: bool, cache_text_embeddings: bool) -> None:
        """Switches that change how fast a step runs, not what it computes (models/acceleration.py)."""
        if channels_last:
            use_channels_last(self.unet, self.vae)
        elif vae_channels_last:  # the frozen encoder only: pixel batches and the latent cache encode faster
            use_channels_last(self.vae)
        frozen_encoder = cache_text_embeddings and not self.hparams.train_text_encoder
        self.prompt_cache = PromptEmbeddingCache(self.frozen_prompt_hidden) if frozen_encoder else None
        self._empty_ids: dict[tuple[int, str], torch.Tensor] = {}

    # -- structure --------------------------------------------------------------------------
    def expected_in_channels(self) -> int:
        return self.vae.config.latent_channels

    def check_unet_channels(self) -> None:
        got, want = self.unet.config.in_channels, self.expected_in_channels()
        if got != want:
            raise ValueError(
                f"{type(self).__name__} needs a UNet with {want} input channels, this one has {got} "
                "(an inpainting UNet? use task=inpaint)"
            )

    def trainable_modules(self) -> list[torch.nn.Module]:
        chosen = [(self.unet, self.hparams.train_unet), (self.text_encoder, self.hparams.train_text_encoder)]
        return [module for module, trained in chosen if trained]

    def frozen_modules(self) -> list[torch.nn.Module]:
        trained = {id(m) for m in self.trainable_modules()}
        return [m for m in (self.vae, self.unet, self.text_encoder) if id(m) not in trained]

    def freeze_frozen_parts(self) -> None:
        """Frozen parts: no gradients, eval mode, out of the optimiser."""
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()
        for module in self.trainable_modules():
            if self.lora is None:  # LoRA: add_lora left only the adapters trainable
                module.requires_grad_(True)
            module.train()  # from_pretrained returns eval-mode models; Lightning keeps modes as found

    def train(self, mode: bool = True):
        """Lightning calls .train() at every fit/validation switch; frozen parts stay in eval."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        if self.hparams.train_text_encoder:
            self.text_encoder.gradient_checkpointing_enable()

    def setup(self, stage: str) -> None:
        check_master_weights(self)

    # -- the loss ---------------------------------------------------------------------------
    def image_latents(self, batch: Mapping, generator: torch.Generator, prefix: str = "") -> torch.Tensor:
        """Scaled latents from the latent cache (mean/logvar) or by encoding pixels with the VAE."""
        scaling = self.vae.config.scaling_factor
        if f"{prefix}latent_mean" in batch:
            # drawn in the cache's dtype (the VAE's), so the numbers equal a pixel batch's encode
            mean = batch[f"{prefix}latent_mean"].to(self.device)
            logvar = batch[f"{prefix}latent_logvar"].to(self.device)
            return diffusion.latents_from_dist(mean, logvar, scaling, generator).float()
        key = f"{prefix}pixel_values"
        if key not in batch:
            raise KeyError(f"batch has neither {prefix}latent_mean nor {key}: keys {sorted(batch)}")
        with torch.no_grad(), self.outside_autocast():
            pixels = batch[key].to(device=self.device, dtype=self.vae.dtype)
            return diffusion.encode_latents(self.vae, pixels, generator).float()

    def outside_autocast(self):
        """Frozen parts run in their own dtype: an fp16 VAE under bf16 autocast mixes dtypes on CPU."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def empty_prompt_ids(self, length: int) -> torch.Tensor:
        """Token ids of the empty prompt (the unconditional branch of classifier-free guidance), tokenised once."""
        key = (int(length), str(self.device))
        if key not in self._empty_ids:
            ids = self.tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            self._empty_ids[key] = ids.input_ids[0].to(self.device)
        return self._empty_ids[key]

    def frozen_prompt_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.outside_autocast():
            return self.text_encoder(input_ids.to(self.device))[0]

    def encode_prompts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """CLIP hidden states; a frozen encoder's come from the prompt cache (task.module.cache_text_embeddings)."""
        if self.hparams.train_text_encoder:
            hidden = self.text_encoder(input_ids.to(self.device))[0]
        elif self.prompt_cache is not None:
            with self.outside_autocast():
                hidden = self.prompt_cache.embed(input_ids.to(self.device))
        else:
            hidden = self.frozen_prompt_hidden(input_ids)
        return hidden.to(self.unet.dtype)

    def unet_input(self, noisy: torch.Tensor, batch: Mapping, generator: torch.Generator) -> torch.Tensor:
        """What the UNet sees besides time and text: the noisy latents (inpainting adds more)."""
        return noisy

    def compute_loss(self, batch: Mapping, generator: torch.Generator, prompt_dropout: float) -> torch.Tensor:
        """One diffusion loss; the order of random draws is fixed so cached and pixel batches match."""
        latents = self.image_latents(batch, generator)
        noise = diffusion.sample_noise(latents, generator, self.hparams.noise_offset)
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = diffusion.sample_timesteps(latents.shape[0], num_train_timesteps, latents.device, generator)
        noisy = diffusion.noisy_latents(self.noise_scheduler, latents, noise, timesteps)
        model_input = self.unet_input(noisy, batch, generator)
        input_ids = batch["input_ids"].to(self.device)
        if prompt_dropout > 0:
            empty = self.empty_prompt_ids(input_ids.shape[-1])
            input_ids = diffusion.drop_prompts(input_ids, empty, prompt_dropout, generator)
        hidden = self.encode_prompts(input_ids)
        prediction = self.unet(model_input, timesteps, encoder_hidden_states=hidden).sample
        target = diffusion.diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        return self.weighted_loss(prediction.float(), target.float(), timesteps, batch.get("is_prior"))

    def weighted_loss(self, prediction, target, timesteps, is_prior=None) -> torch.Tensor:
        """Plain diffusion loss, or instance + prior_loss_weight * prior (DreamBooth preservation)."""

        def loss_of(rows):
            return diffusion.diffusion_loss(
                prediction[rows], target[rows], self.hparams.snr_gamma, self.noise_scheduler, timesteps[rows]
            )

        if is_prior is None:
            return loss_of(slice(None))
        prior = torch.as_tensor(is_prior, dtype=torch.bool, device=prediction.device).reshape(-1)
        if not prior.any():
            return loss_of(slice(None))
        prior_loss = self.hparams.prior_loss_weight * loss_of(prior)
        return loss_of(~prior) + prior_loss if (~prior).any() else prior_loss

    # -- Lightning steps --------------------------------------------------------------------
    def micro_batch_index(self) -> int:
        """Which micro-batch of the current optimiser step this is (0 without accumulation).

        Lightning's batch_idx is not reproducible across a resume (it can continue counting
        into a restarted epoch), so the generator key counts micro-batches per global step.
        """
        if self._micro_step != self.global_step:
            self._micro_step, self._micro_index = self.global_step, 0
        else:
            self._micro_index += 1
        return self._micro_index

    def training_step(self, batch: Mapping, batch_idx: int):
        micro = self.micro_batch_index()
        generator = step_generator(self.hparams.seed, self.global_step, micro, self.global_rank, self.device)
        loss = self.compute_loss(batch, generator, self.hparams.prompt_dropout)
        batch_size = len(batch["input_ids"])
        self.attempted_steps += 1
        if not torch.isfinite(loss):
            return self.nonfinite_loss(loss, batch_idx, batch_size)
        self.consecutive_skipped = 0
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        if self._trainer is not None and self.trainer.optimizers and logging_step(self.trainer):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def nonfinite_loss(self, loss: torch.Tensor, batch_idx: int, batch_size: int):
        message = (
            f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
            f"(batch {batch_idx}); {NONFINITE_HINT}"
        )
        if self.hparams.nonfinite == "stop":
            raise TrainingDiverged(message + ". Set task.module.nonfinite=skip to skip such steps instead.")
        self.skipped_steps += 1
        self.consecutive_skipped += 1
        log.warning("skipping step: %s", message)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, batch_size=batch_size)
        self.check_skipped()
        return None

    def check_skipped(self) -> None:
        """Stop a run that skips more than rare bad batches: it has diverged, its weights are no use."""
        in_a_row, most = self.consecutive_skipped, int(self.hparams.max_consecutive_skipped)
        fraction = float(self.hparams.max_skipped_fraction)
        too_many = self.skipped_steps > fraction * max(self.attempted_steps, FRACTION_WINDOW)
        if in_a_row >= most or too_many:
            why = (f"the last {in_a_row} steps were all skipped (task.module.max_consecutive_skipped={most})"
                   if in_a_row >= most else
                   f"{self.skipped_steps} of {self.attempted_steps} steps were skipped, more than "
                   f"task.module.max_skipped_fraction={fraction:g}")
            raise TrainingDiverged(f"training diverged at global step {self.global_step}: {why} for a non-finite "
                                   f"loss; {NONFINITE_HINT}")

    def validation_step(self, batch: Mapping, batch_idx: int):
        generator = step_generator(self.hparams.seed, 0, batch_idx, self.global_rank, self.device, VAL_STREAM)
        loss = self.compute_loss(batch, generator, prompt_dropout=0.0)
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch["input_ids"]))
        return loss

    def optimizer_parameters(self) -> list:
        """What the optimiser updates: every trainable weight (subclasses may return param groups)."""
        return [p for module in self.trainable_modules() for p in module.parameters() if p.requires_grad]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError(
                f"{type(self).__name__} was built without an optimizer: pass optimizer=<partial "
                "taking the parameters>, e.g. hydra's conf/optimizer with _partial_: true"
            )
        optimizer = self.optimizer_factory(self.optimizer_parameters())
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)  # stepped per optimizer step
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- EMA and checkpoints ----------------------------------------------------------------
    def on_train_start(self) -> None:
        self.train()
        self._ema_last_step = self.global_step
        if self.ema is not None:
            ema_on_device(self.ema, self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Average after each optimiser step (global_step only advances when one happened)."""
        if self.ema is None or self.global_step == self._ema_last_step:
            return
        self._ema_last_step = self.global_step
        if outputs is not None:
            ema_step(self.ema, self.unet)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["attempted_steps"] = self.attempted_steps
        checkpoint["consecutive_skipped"] = self.consecutive_skipped
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        if self.lora is not None:  # the adapters and their optimiser state only: the base is rebuilt from the config
            checkpoint["state_dict"] = adapter_state(self, checkpoint["state_dict"])
            checkpoint[CHECKPOINT_KEY] = self.lora.summary()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A LoRA run's checkpoint holds only the adapters: checked against this run's, the base is kept."""
        if self.lora is not None:
            check_adapter_state(self, state_dict)
            strict = False
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_kind(checkpoint, self.lora)
        if self.prompt_cache is not None:  # the frozen encoder's weights may come from the checkpoint
            self.prompt_cache.clear()
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self.attempted_steps = int(checkpoint.get("attempted_steps", checkpoint.get("global_step", 0)))
        self.consecutive_skipped = int(checkpoint.get("consecutive_skipped", 0))
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        elif self.ema is not None:
            log.warning("checkpoint has no EMA state: the average starts from this module's weights")


def check_master_weights(module: torch.nn.Module) -> None:
    """Mixed precision needs fp32 trainable weights ("Attempting to unscale FP16 gradients")."""
    wrong = [(name, p.dtype) for name, p in module.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if wrong:
        names = ", ".join(f"{name} ({dtype})" for name, dtype in wrong[:3])
        raise TypeError(
            f"{len(wrong)} trainable weights are not float32, e.g. {names}. Trainable weights must be "
            "fp32 master weights (autocast handles the low precision): load the model with "
            "frozen_dtype applying to frozen parts only, or train in precision=32"
        )
