"""Bad input found before any generation or training: wrong model folders, too little data, too
many synthetic images for the time budget. Each error is one line naming the key and the problem."""

from __future__ import annotations

from pathlib import Path

from mame_lightning.pipelines.loading import ModelNotFoundError, detect_task, read_metadata


class UtilityError(ValueError):
    """The study cannot run as asked; the message says which key to change."""


def check_model_folder(path, task: str, key: str) -> Path:
    """`path` must be an exported pipeline folder of `task`; the task is read from its sidecar (or
    its UNet's input channels) without loading any weights."""
    if not path:
        raise UtilityError(f"{key} is not set: give {key}=EXPORT_DIR (a `python -m mame_lightning.train` run's export/)")
    folder = Path(str(path)).expanduser()
    if not (folder / "model_index.json").is_file():
        what = "is not an exported pipeline folder (no model_index.json)" if folder.is_dir() else "does not exist"
        raise UtilityError(f"{key}={folder} {what}; `make demo` trains the phantom models, or pass an export folder")
    try:
        found = detect_task(folder, read_metadata(folder))
    except (ModelNotFoundError, ValueError) as error:
        raise UtilityError(f"{key}={folder}: {error}") from error
    if found != task:
        raise UtilityError(f"{key}={folder} holds a model of task {found!r}, but {key} needs task {task!r}")
    return folder


def check_budget(n: int, seconds_per_image: float, budget_s: float) -> None:
    """Refuse a synthetic set that would take longer than `synthesis.budget_s` to generate."""
    estimate = n * seconds_per_image
    if estimate > budget_s:
        fits = int(budget_s // max(seconds_per_image, 1e-9))
        raise UtilityError(
            f"n_synthetic={n} needs about {estimate:.0f} s of generation at {seconds_per_image:.2f} s per "
            f"lesion image, more than synthesis.budget_s={budget_s:g}; lower n_synthetic to {fits} or less, "
            "or raise synthesis.budget_s")


def check_positive(value, key: str) -> int:
    number = int(value)
    if number < 1:
        raise UtilityError(f"{key}={value}: must be at least 1")
    return number
