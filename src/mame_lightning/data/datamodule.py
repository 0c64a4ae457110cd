"""Training data from a prepared set: a Dataset per task folder and the LightningDataModule.

Training reads only the prepared set (see docs/architecture.md, "Prepared set on disk"); the
batch keys produced here are the contract the LightningModules code against ("Batches").
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from mame_lightning.data.sampling import ResumableStreamSampler

TASKS = ("text2image", "inpaint")
ATTRIBUTE_COLUMNS = {"views": "view", "areas": "area", "densities": "density", "vendors": "vendor"}
PREPARE_COMMAND = (
    "python -m mame_lightning.prepare dataset={name} dataset.raw_dir=<raw dir> "
    "dataset.prepared_dir={prepared_dir}"
)


def task_folder(folder: str | Path, task: str) -> Path:
    """The folder holding `metadata.jsonl` for `task`: `folder/task`, or `folder` itself when it
    already is a task folder (so both the prepared root and a task folder are accepted)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    folder = Path(folder)
    if not (folder / task / "metadata.jsonl").is_file() and (folder / "metadata.jsonl").is_file():
        return folder
    return folder / task


def read_metadata(path: str | Path, task: str) -> list[dict]:
    """Parse one metadata.jsonl; a bad line is reported by file and line number."""
    path = Path(path)
    required = ("id", "file_name", "prompt") + (("mask",) if task == "inpaint" else ())
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        missing = [key for key in required if key not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing field(s) {missing}")
        records.append(record)
    ids = [record["id"] for record in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids in metadata")
    return records


def check_listed_files(folder: Path, records: list[dict], metadata_path: Path) -> None:
    """Every image (and mask) the listing names is on disk: one pass, before anything trains on it."""
    missing = [record[key] for record in records for key in ("file_name", "mask")
               if key in record and not (folder / record[key]).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{metadata_path}: {len(missing)} listed file(s) missing from {folder} ({shown}); "
                                "prepare the set again (python -m mame_lightning.prepare ...) to rebuild it")


def missing_set_error(prepared_dir: str | Path, task: str, dataset_name: str | None) -> FileNotFoundError:
    """The one-line-plus-command error for a prepared set that is not there."""
    command = PREPARE_COMMAND.format(name=dataset_name or "<name>", prepared_dir=prepared_dir)
    return FileNotFoundError(
        f"Prepared set not found: {task_folder(prepared_dir, task) / 'metadata.jsonl'} does not exist "
        f"(prepared_dir={prepared_dir}). Prepare it first with:\n  {command}"
    )


def check_prepared_files(prepared_dir: str | Path, task: str, dataset_name: str | None = None,
                         can_prepare: bool = True) -> None:
    """`check_listed_files` for a prepared set's task folder. A missing set is an error unless the
    dataset prepares itself on first use (`can_prepare`)."""
    folder = task_folder(prepared_dir, task)
    if (folder / "metadata.jsonl").is_file():
        check_listed_files(folder, read_metadata(folder / "metadata.jsonl", task), folder / "metadata.jsonl")
    elif not can_prepare:
        raise missing_set_error(prepared_dir, task, dataset_name)


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """All prompts in one call, padded to the text encoder's length -> LongTensor [N, L]."""
    if not prompts:
        return torch.zeros(0, tokenizer.model_max_length, dtype=torch.long)
    encoded = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return encoded.input_ids.long()


def load_gray(path: Path, resolution: int | None, resample: Image.Resampling) -> np.ndarray:
    """An 8-bit grayscale PNG as uint8 HxW, resized to resolution×resolution when asked."""
    try:
        with Image.open(path) as image:
            image = image.convert("L")
            if resolution is not None and image.size != (resolution, resolution):
                image = image.resize((resolution, resolution), resample=resample)
            return np.asarray(image, dtype=np.uint8).copy()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: image listed in metadata.jsonl is missing") from error
    except OSError as error:
        raise OSError(f"{path}: cannot read image ({error})") from error


def to_pixel_values(gray: np.ndarray) -> torch.Tensor:
    """uint8 HxW -> float32 3xHxW in [-1, 1]: the VAE expects RGB, mammograms are gray."""
    single = torch.from_numpy(gray).float().div(127.5).sub(1.0)
    return single.unsqueeze(0).repeat(3, 1, 1)


def to_mask(gray: np.ndarray) -> torch.Tensor:
    """uint8 HxW (255 inside lesions) -> float32 1xHxW in {0, 1}."""
    return torch.from_numpy(gray > 127).float().unsqueeze(0)


class PreparedImageDataset(Dataset):
    """One task folder of a prepared set; prompts are tokenised once, here, not per item."""

    def __init__(
        self,
        folder: str | Path,
        task: str,
        tokenizer,
        ids: list[str] | None = None,
        resolution: int | None = None,
    ):
        if tokenizer is None:
            raise ValueError("PreparedImageDataset needs a tokenizer (the text encoder's)")
        self.task = task
        self.folder = task_folder(folder, task)
        self.metadata_path = self.folder / "metadata.jsonl"
        if not self.metadata_path.is_file():
            raise FileNotFoundError(f"{self.metadata_path}: prepared metadata not found")
        self.resolution = resolution
        records = read_metadata(self.metadata_path, task)
        if ids is not None:
            by_id = {record["id"]: record for record in records}
            unknown = [i for i in ids if i not in by_id]
            if unknown:
                raise KeyError(f"{self.metadata_path}: ids not in the prepared set: {unknown[:5]}")
            records = [by_id[i] for i in ids]
        if not records:
            raise ValueError(f"{self.metadata_path}: no images to train on")
        check_listed_files(self.folder, records, self.metadata_path)
        self.records = records
        self.input_ids = tokenize_prompts(tokenizer, [r["prompt"] for r in records])

    @property
    def ids(self) -> list[str]:
        return [record["id"] for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, ids: Sequence[str]) -> PreparedImageDataset:
        """The same dataset restricted to `ids`, sharing the already tokenised prompts."""
        position = {record["id"]: index for index, record in enumerate(self.records)}
        unknown = [i for i in ids if i not in position]
        if unknown:
            raise KeyError(f"{self.metadata_path}: ids not in this dataset: {list(unknown)[:5]}")
        rows = [position[i] for i in ids]
        part = copy.copy(self)
        part.records = [self.records[row] for row in rows]
        part.input_ids = self.input_ids[rows] if rows else self.input_ids[:0]
        return part

    def text_item(self, index: int) -> dict[str, Any]:
        """The keys every batch carries, whatever holds the image (pixels or cached latents)."""
        record = self.records[index]
        return {
            "input_ids": self.input_ids[index],
            "prompt": record["prompt"],
            "id": record["id"],
            "index": index,
        }

    def load_pixels(self, index: int) -> torch.Tensor:
        path = self.folder / self.records[index]["file_name"]
        return to_pixel_values(load_gray(path, self.resolution, Image.Resampling.BILINEAR))

    def load_mask(self, index: int) -> torch.Tensor:
        path = self.folder / self.records[index]["mask"]
        return to_mask(load_gray(path, self.resolution, Image.Resampling.NEAREST))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.text_item(index)
        item["pixel_values"] = self.load_pixels(index)
        if self.task == "inpaint":
            mask = self.load_mask(index)
            item["mask"] = mask
            # diffusers' inpainting convention: the normalised image is zeroed under the mask
            item["masked_pixel_values"] = item["pixel_values"] * (mask < 0.5)
        return item


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
        from mame_lightning.data.inpaint_mix import healthy_options  # imports this module: keep it lazy

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

    # -- wiring done by the train entry point ------------------------------------------------
    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def set_vae(self, vae) -> None:
        self.vae = vae

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
            from mame_lightning.data.inpaint_mix import lesion_ids

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
        self.train_dataset, self.val_dataset = train, val

    def _cache_of(self, full: PreparedImageDataset) -> Path:
        """Encode (or reuse) the latent cache of a whole task folder."""
        from mame_lightning.data import latent_cache  # imports this module: keep it lazy

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
        from mame_lightning.data.latent_cache import LatentCacheDataset

        self.latent_cache_path = self._cache_of(full)
        return (
            LatentCacheDataset(train, self.latent_cache_path, pixels=self.cache_pixels),
            LatentCacheDataset(val, self.latent_cache_path, pixels=self.cache_pixels),
        )

    def _with_healthy(self, lesions: Dataset) -> Dataset:
        """Training lesion images plus a share of the healthy training images (data/inpaint_mix.py)."""
        from mame_lightning.data import inpaint_mix
        from mame_lightning.data.latent_cache import LatentCacheDataset

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

    def _rank_zero_first(self, fn: Callable[[], Any]) -> Any:
        """Under several processes rank 0 builds first; the others then find and reuse it."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return fn()
        result = fn() if trainer.is_global_zero else None
        trainer.strategy.barrier("latent_cache")
        return result if result is not None else fn()

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if train and self.sampling == "stream":
            sampler = ResumableStreamSampler.for_trainer(len(dataset), self.batch_size, self.seed, self.trainer)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                              pin_memory=self.pin_memory,
                              persistent_workers=self.persistent_workers and self.num_workers > 0)
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=generator,
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
