"""The LightningDataModule of a prepared set: train/validation split, samplers, the latent cache and
the inpainting mix switched on from the config."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import lightning
from torch.utils.data import DataLoader, Dataset
from mame_lightning.data.loading.sampling import ResumableStreamSampler
from mame_lightning.data.loading.prepared_set import PreparedImageDataset, TASKS, ATTRIBUTE_COLUMNS, missing_set_error, task_folder


def split_ids(
    ids: Sequence[str], val_fraction: float, val_max: int | None, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded, order-independent validation split: ids ranked by a hash of (seed, id), so the
    same seed gives the same split and adding images moves few existing ids."""
    n = len(ids)
    if n < 2 or val_fraction <= 0 or val_max == 0:
        return list(ids), []
    n_val = max(1, round(val_fraction * n))
    if val_max is not None:
        n_val = min(n_val, val_max)
    n_val = min(n_val, n - 1)
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def latent_cache_options(latent_cache: Mapping | bool | None) -> dict:
    """`true`/`false` or a mapping (`enabled` defaults to true once a mapping is given)."""
    if latent_cache is None or isinstance(latent_cache, bool):
        return {"enabled": bool(latent_cache)}
    return {"enabled": True} | dict(latent_cache)


class PreparedDataModule(lightning.LightningDataModule):
    """Feeds training from `prepared_dir/<task>`; optionally from a cache of VAE latents."""

    def __init__(
        self,
        prepared_dir: str,
        task: str = "text2image",
        tokenizer=None,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        val_fraction: float = 0.05,
        val_max: int | None = 64,
        seed: int = 0,
        persistent_workers: bool = False,
        latent_cache: dict | bool | None = None,
        prepare_fn: Callable[[], Any] | None = None,
        resolution: int | None = None,
        dataset_name: str | None = None,
        sampling: str = "epoch",
        healthy: Mapping | None = None,
        lesion_categories: Sequence[str] | None = None,
    ):
        super().__init__()
        if sampling not in ("epoch", "stream"):
            raise ValueError(f"sampling must be 'epoch' or 'stream', got {sampling!r}")
        self.sampling = sampling
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        self.prepared_dir = Path(prepared_dir)
        self.task = task
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.val_fraction = val_fraction
        self.val_max = val_max
        self.seed = seed
        self.persistent_workers = persistent_workers
        self.prepare_fn = prepare_fn
        self.resolution = resolution
        self.dataset_name = dataset_name
        from mame_lightning.data.loading.inpaint_mix import healthy_options  # imports this module: keep it lazy

        # inpainting only: healthy images (text2image/) join training under their own caption
        self.healthy = healthy_options(healthy) if task == "inpaint" else None
        self.lesion_categories = list(lesion_categories) if lesion_categories and task == "inpaint" else None
        cache_options = latent_cache_options(latent_cache)
        self.vae = cache_options.pop("vae", None)
        self.cache_pixels = bool(cache_options.pop("pixels", False))
        self.latent_cache_options = cache_options
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.latent_cache_path: Path | None = None
        self.prior_images: Path | None = None  # class images of prior preservation (set_prior_images)

    # -- wiring done by the train entry point ------------------------------------------------
    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def set_vae(self, vae) -> None:
        self.vae = vae

    def set_prior_images(self, folder) -> None:
        """Pair every training image with one of these class images (data/loading/prior_mix.py)."""
        self.prior_images = Path(folder)

    @property
    def metadata_path(self) -> Path:
        return task_folder(self.prepared_dir, self.task) / "metadata.jsonl"

    @property
    def uses_latent_cache(self) -> bool:
        return bool(self.latent_cache_options["enabled"])

    def missing_error(self) -> FileNotFoundError:
        return missing_set_error(self.prepared_dir, self.task, self.dataset_name)

    # -- Lightning hooks ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Create the prepared set on first use when a preparation callable was given."""
        if self.metadata_path.is_file():
            return
        if self.prepare_fn is None:
            raise self.missing_error()
        self.prepare_fn()
        if not self.metadata_path.is_file():
            raise self.missing_error()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if not self.metadata_path.is_file():
            raise self.missing_error()
        if self.tokenizer is None:
            raise RuntimeError(
                "PreparedDataModule needs the model's tokenizer before setup(): "
                "call set_tokenizer(tokenizer) or pass tokenizer="
            )
        full = PreparedImageDataset(
            self.prepared_dir, self.task, self.tokenizer, resolution=self.resolution
        )
        if self.lesion_categories:
            from mame_lightning.data.loading.inpaint_mix import lesion_ids

            ids = lesion_ids(full.records, self.lesion_categories)
            if not ids:
                raise ValueError(f"{self.metadata_path}: no lesion box of categories {self.lesion_categories}")
            full = full.subset(ids)
        train_ids, val_ids = split_ids(full.ids, self.val_fraction, self.val_max, self.seed)
        train, val = full.subset(train_ids), full.subset(val_ids)
        if self.drop_last and len(train) < self.batch_size:
            raise ValueError(
                f"{self.metadata_path}: {len(train)} training images, fewer than one batch "
                f"(batch_size={self.batch_size}, drop_last=True): lower batch_size"
            )
        if self.uses_latent_cache:
            train, val = self._cached(full, train, val)
        if self.healthy is not None:
            train = self._with_healthy(train)
        if self.prior_images is not None:
            train = self._with_prior(train)
        self.train_dataset, self.val_dataset = train, val

    def _cache_of(self, full: PreparedImageDataset) -> Path:
        """Encode (or reuse) the latent cache of a whole task folder."""
        from mame_lightning.data.loading import latent_cache

        if self.vae is None:
            raise RuntimeError("latent_cache.enabled needs the VAE: call set_vae(vae) before setup()")
        options = self.latent_cache_options
        cache_dir = Path(options.get("dir") or self.prepared_dir / "latent_cache")

        def build() -> Path:
            return latent_cache.build_latent_cache(
                self.vae,
                full,
                cache_dir,
                batch_size=int(options.get("batch_size", 8)),
                device=latent_cache.resolve_device(options.get("device"), self.vae),
                storage_dtype=options.get("dtype"),
            )

        return self._rank_zero_first(build)

    def _cached(self, full, train, val) -> tuple[Dataset, Dataset]:
        """Serve the splits' latents from the task folder's cache."""
        from mame_lightning.data.loading.latent_cache import LatentCacheDataset

        self.latent_cache_path = self._cache_of(full)
        return (
            LatentCacheDataset(train, self.latent_cache_path, pixels=self.cache_pixels),
            LatentCacheDataset(val, self.latent_cache_path, pixels=self.cache_pixels),
        )

    def _with_healthy(self, lesions: Dataset) -> Dataset:
        """Training lesion images plus a share of the healthy training images (data/loading/inpaint_mix.py)."""
        from mame_lightning.data.loading import inpaint_mix
        from mame_lightning.data.loading.latent_cache import LatentCacheDataset

        if not (task_folder(self.prepared_dir, "text2image") / "metadata.jsonl").is_file():
            raise FileNotFoundError(f"healthy images for inpainting: {task_folder(self.prepared_dir, 'text2image')}"
                                    "/metadata.jsonl not found (set datamodule.healthy=null to train without them)")
        full = PreparedImageDataset(self.prepared_dir, "text2image", self.tokenizer, resolution=self.resolution)
        train_ids, _ = split_ids(full.ids, self.val_fraction, self.val_max, self.seed)
        count = inpaint_mix.healthy_count(float(self.healthy["share"]), len(lesions), len(train_ids))
        chosen = full.subset(inpaint_mix.pick_healthy(train_ids, count, self.seed))
        healthy = inpaint_mix.recaption(chosen, str(self.healthy["prompt"]), self.tokenizer)
        if self.uses_latent_cache:
            healthy = LatentCacheDataset(healthy, self._cache_of(full), pixels=self.cache_pixels)
        mask_size = tuple(lesions[0]["mask"].shape[-2:])
        return inpaint_mix.InpaintMix(lesions, healthy, mask_size)

    def _with_prior(self, instances: Dataset) -> Dataset:
        """Training images, each with a class image (latents from the cache when the training images use it)."""
        from mame_lightning.data.loading.latent_cache import LatentCacheDataset
        from mame_lightning.data.loading.prior_mix import PriorMix

        classes = PreparedImageDataset(self.prior_images, "text2image", self.tokenizer, resolution=self.resolution)
        if self.uses_latent_cache:
            classes = LatentCacheDataset(classes, self._cache_of(classes), pixels=self.cache_pixels)
        return PriorMix(instances, classes)

    def _rank_zero_first(self, fn: Callable[[], Any]) -> Any:
        """Under several processes rank 0 builds first; the others then find and reuse it."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return fn()
        result = fn() if trainer.is_global_zero else None
        trainer.strategy.barrier("latent_cache")
        return result if result is not None else fn()

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        collate = getattr(dataset, "collate", None)  # a dataset that batches its own way (PriorMix)
        if train and self.sampling == "stream":
            sampler = ResumableStreamSampler.for_trainer(len(dataset), self.batch_size, self.seed, self.trainer)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                              collate_fn=collate,
                              pin_memory=self.pin_memory,
                              persistent_workers=self.persistent_workers and self.num_workers > 0)
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=generator,
            collate_fn=collate,
            drop_last=self.drop_last if train else False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError("PreparedDataModule.setup() has not run yet")

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if len(self.val_dataset) == 0:
            return []
        return self._loader(self.val_dataset, train=False)

    # -- what export records ----------------------------------------------------------------
    def attributes(self) -> dict[str, list[str]]:
        """Attribute values present in the training split (what prompts may ask for)."""
        self._require_setup()
        records = self.train_dataset.records
        return {
            name: sorted({r[column] for r in records if r.get(column) is not None})
            for name, column in ATTRIBUTE_COLUMNS.items()
        }

    def counts(self) -> dict[str, int]:
        self._require_setup()
        return {"train": len(self.train_dataset), "val": len(self.val_dataset)}

    def attribute_counts(self) -> dict[str, dict[str, int]]:
        """Training images per attribute value (the model card's recipe)."""
        self._require_setup()
        records = self.train_dataset.records
        return {
            name: dict(sorted(Counter(str(r[column]) for r in records if r.get(column) is not None).items()))
            for name, column in ATTRIBUTE_COLUMNS.items()
        }

