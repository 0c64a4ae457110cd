"""Reading a prepared set: its task folders, metadata and images, as a torch Dataset.

Training reads only the prepared set (see docs/architecture.md, "Prepared set on disk"); the
batch keys produced here are the contract the LightningModules code against ("Batches"). The
datamodule, the latent cache and the inpainting mix all read through this module.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

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


