"""Cache of VAE latent distributions, so training does not re-encode frozen-VAE inputs each epoch.

The cache keeps the distribution (mean and clamped log-variance of `vae.encode(x).latent_dist`),
not one sample: training draws `mean + exp(logvar / 2) * noise` exactly as it would from pixels.
Its key hashes everything the latents depend on (VAE weights and config, resolution, metadata and
image bytes, storage dtype), so a stale cache is never read.

Layout: `cache_dir/<key>/shard-NNNNN.safetensors` + `index.json`, the index written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mame_lightning.data.loading.prepared_set import PreparedImageDataset, read_metadata, task_folder
from mame_lightning.io import atomic_path, write_json

CACHE_FORMAT = "1"
SHARD_SIZE = 1024
IMAGE_TENSORS = ("latent_mean", "latent_logvar")
MASKED_TENSORS = ("masked_latent_mean", "masked_latent_logvar")


def tensor_names(task: str) -> tuple[str, ...]:
    return IMAGE_TENSORS + (MASKED_TENSORS if task == "inpaint" else ())


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None keeps the VAE's own dtype (exact); "float16" halves the cache at a rounding cost."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"latent cache dtype {dtype!r} is not a torch dtype name")
    return resolved


def resolve_device(device: str | None, vae) -> torch.device:
    """Where to encode: as asked, else CUDA when present (setup runs before the model is moved)."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return next(vae.parameters()).device


def _update_with_tensors(digest, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, tensor in named_tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def _update_with_file(digest, path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: listed in metadata.jsonl but missing") from error


def cache_key(
    vae,
    resolution: int | None,
    prepared_folder: str | Path,
    task: str,
    storage_dtype: str | torch.dtype | None = None,
) -> str:
    """Hex digest of VAE weights + config, resolution, task, metadata and every image/mask byte."""
    folder = task_folder(prepared_folder, task)
    metadata_path = folder / "metadata.jsonl"
    digest = hashlib.sha256()
    config = dict(getattr(vae, "config", {}) or {})
    header = {
        "format": CACHE_FORMAT,
        "vae_class": type(vae).__name__,
        "vae_config": config,
        "resolution": resolution,
        "task": task,
        "storage_dtype": str(resolve_dtype(storage_dtype)),
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    _update_with_tensors(digest, sorted(vae.state_dict().items()))
    digest.update(metadata_path.read_bytes())
    for record in read_metadata(metadata_path, task):
        for column in ("file_name", "mask"):
            if column in record and (column == "file_name" or task == "inpaint"):
                digest.update(record[column].encode())
                _update_with_file(digest, folder / record[column])
    return digest.hexdigest()


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as temporary:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(temporary))


def read_index(cache_path: str | Path) -> dict | None:
    """The cache's index, or None while it is absent (missing or still being written)."""
    index_path = Path(cache_path) / "index.json"
    if not index_path.is_file():
        return None
    return json.loads(index_path.read_text(encoding="utf-8"))


@torch.no_grad()
def _encode(vae, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype | None):
    """Mean and clamped log-variance of the VAE posterior, in the VAE's dtype unless told."""
    vae_dtype = next(vae.parameters()).dtype
    posterior = vae.encode(pixels.to(device=device, dtype=vae_dtype)).latent_dist
    target = dtype or vae_dtype
    return posterior.mean.to("cpu", target), posterior.logvar.to("cpu", target)


def build_latent_cache(
    vae,
    dataset: PreparedImageDataset,
    cache_dir: str | Path,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    storage_dtype: str | torch.dtype | None = None,
    shard_size: int = SHARD_SIZE,
) -> Path:
    """Encode `dataset` once (reusing a complete cache with the same key) -> the cache folder."""
    dtype = resolve_dtype(storage_dtype)
    key = cache_key(vae, dataset.resolution, dataset.folder, dataset.task, dtype)
    cache_path = Path(cache_dir) / key
    index = read_index(cache_path)
    if index is not None and set(dataset.ids) <= set(index["ids"]):
        return cache_path
    cache_path.mkdir(parents=True, exist_ok=True)
    (cache_path / "index.json").unlink(missing_ok=True)  # shards are about to be rewritten
    device = torch.device(device)
    home = next(vae.parameters()).device
    vae.to(device)
    names = tensor_names(dataset.task)
    shards: list[dict[str, Any]] = []
    pending: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    pending_ids: list[str] = []

    def flush() -> None:
        file_name = f"shard-{len(shards):05d}.safetensors"
        _save_shard(cache_path / file_name, {n: torch.cat(pending[n]) for n in names})
        shards.append({"file": file_name, "ids": list(pending_ids)})
        pending_ids.clear()
        for parts in pending.values():
            parts.clear()

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    try:
        for batch in tqdm(loader, desc=f"encoding latents ({dataset.task})", unit="batch"):
            mean, logvar = _encode(vae, batch["pixel_values"], device, dtype)
            pending["latent_mean"].append(mean)
            pending["latent_logvar"].append(logvar)
            if dataset.task == "inpaint":
                mean, logvar = _encode(vae, batch["masked_pixel_values"], device, dtype)
                pending["masked_latent_mean"].append(mean)
                pending["masked_latent_logvar"].append(logvar)
            pending_ids.extend(batch["id"])
            if len(pending_ids) >= shard_size:
                flush()
        if pending_ids:
            flush()
    finally:
        vae.to(home)
    index = {
        "format": CACHE_FORMAT,
        "key": key,
        "task": dataset.task,
        "resolution": dataset.resolution,
        "tensors": list(names),
        "ids": [i for shard in shards for i in shard["ids"]],
        "shards": shards,
    }
    write_json(cache_path / "index.json", index, indent=None)
    return cache_path


class LatentCacheDataset(Dataset):
    """A PreparedImageDataset whose images are served as cached latent distributions.

    Items: latent_mean, latent_logvar (C×h×w), input_ids, prompt, id, index; inpainting adds
    masked_latent_mean, masked_latent_logvar and the full-resolution mask (1×H×W). With `pixels`
    the image pixels come too (inpainting with random masks encodes its masked images per step).
    """

    def __init__(self, images: PreparedImageDataset, cache_path: str | Path, pixels: bool = False):
        self.images = images
        self.pixels = bool(pixels)
        self.cache_path = Path(cache_path)
        index = read_index(self.cache_path)
        if index is None:
            raise FileNotFoundError(f"{self.cache_path}: no latent cache here (index.json missing)")
        self.tensor_names = tensor_names(images.task)
        absent = [n for n in self.tensor_names if n not in index["tensors"]]
        if absent:
            raise ValueError(f"{self.cache_path}: cache lacks {absent} needed for {images.task}")
        where = {i: (s["file"], row) for s in index["shards"] for row, i in enumerate(s["ids"])}
        missing = [i for i in images.ids if i not in where]
        if missing:
            raise KeyError(f"{self.cache_path}: {len(missing)} ids not cached, e.g. {missing[:3]}")
        self.locations = [where[i] for i in images.ids]
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    @property
    def records(self) -> list[dict]:
        return self.images.records

    @property
    def ids(self) -> list[str]:
        return self.images.ids

    def __len__(self) -> int:
        return len(self.images)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _shard(self, file_name: str):
        """Shards are memory-mapped lazily, once per worker process."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if file_name not in self._handles:
            self._handles[file_name] = safe_open(str(self.cache_path / file_name), framework="pt")
        return self._handles[file_name]

    def __getitem__(self, index: int) -> dict[str, Any]:
        file_name, row = self.locations[index]
        shard = self._shard(file_name)
        item = self.images.text_item(index)
        for name in self.tensor_names:
            item[name] = shard.get_slice(name)[row]
        if self.images.task == "inpaint":
            item["mask"] = self.images.load_mask(index)
        if self.pixels:
            item["pixel_values"] = self.images.load_pixels(index)
        return item
