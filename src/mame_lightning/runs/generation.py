"""What `python -m mame_lightning.generate` does: load the model(s), generate, write the folder.

Modes: text-to-image (a prompt, or attributes built into the model's template), inpainting (an
image and a box or mask) and the full flow (a healthy image, then a lesion painted into it). Every
PNG is marked synthetic (text chunks); `dicom=true` adds a synthetic DICOM per image. Settings:
conf/generate.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from mame_lightning.data.dicom import DicomError
from mame_lightning.pipelines.generation import GenerationSettings, check_range, inpaint, text2image
from mame_lightning.pipelines.inputs import InputError, inpaint_mask, input_label, load_input_image
from mame_lightning.pipelines.loading import LoadedModel, ModelNotFoundError, load_model
from mame_lightning.pipelines.marking import save_png
from mame_lightning.pipelines.outputs import TIMINGS_FILE, save_results
from mame_lightning.pipelines.prompting import (
    ATTRIBUTE_LISTS,
    UnknownAttributeError,
    build_prompt,
    infer_view,
    validate_attributes,
)
from mame_lightning.runs import command_line

MODES = ("auto", "text2image", "inpaint", "full")
# Override values Hydra would misread: a comma makes a sweep, brackets a list, a colon a dict.
BOX_KEYS = ("box",)
# Free text, and paths: folder names from PACS exports hold characters such as ^ that Hydra's grammar rejects.
TEXT_KEYS = ("prompt", "negative_prompt", "lesion_prompt", "image", "mask", "model_path", "inpaint_model_path", "out")


def protect_overrides(argv: list[str]) -> list[str]:
    """`box=1,2,3,4` -> `box=[1,2,3,4]`; free-text prompts and paths quoted, so they reach us verbatim."""
    return command_line.protect_overrides(argv, BOX_KEYS, TEXT_KEYS)


def settings_from(cfg: DictConfig) -> GenerationSettings:
    return GenerationSettings(
        guidance=float(cfg.guidance), steps=int(cfg.steps), negative_prompt=cfg.negative_prompt or None,
        seed=int(cfg.seed), batch_size=int(cfg.batch_size), progress=bool(cfg.progress),
        max_batch_pixels=int(cfg.max_batch_pixels), accelerate=str(cfg.accelerate),
        deepcache_interval=int(cfg.deepcache.interval),
    )


def attributes_from(cfg: DictConfig) -> dict:
    return {name: cfg.get(name) for name in ATTRIBUTE_LISTS if cfg.get(name) is not None}


def resolve_mode(cfg: DictConfig, task: str) -> str:
    """The mode to run: as asked, or (auto) from the model's task; mismatches are refused."""
    mode = str(cfg.mode)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "auto":
        mode = "full" if task == "text2image" and cfg.inpaint_model_path else task
    wanted = {"text2image": "text2image", "inpaint": "inpaint", "full": "text2image"}[mode]
    if task != wanted:
        raise ValueError(f"mode={mode} needs a {wanted} model, but {cfg.model_path} is a {task} model")
    if mode == "full" and not cfg.inpaint_model_path:
        raise ValueError("mode=full needs inpaint_model_path=INPAINT_EXPORT_DIR as well as model_path")
    if mode == "inpaint" and not cfg.image:
        raise ValueError(f"{cfg.model_path} is an inpainting model: give image=FILE and box=x0,y0,x1,y1 or mask=FILE")
    return mode


def load(cfg: DictConfig, path) -> LoadedModel:
    return load_model(path, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.scheduler)


def prompt_and_attributes(cfg: DictConfig, model: LoadedModel) -> tuple[str, dict]:
    """The text-to-image prompt and the validated attributes it was built from (model spelling)."""
    prompt = build_prompt(model.metadata, "text2image", prompt=cfg.prompt, attributes=attributes_from(cfg))
    return prompt, validate_attributes(attributes_from(cfg), model.metadata)


def run_text2image(cfg: DictConfig, model: LoadedModel, out: Path) -> list[dict]:
    prompt, attributes = prompt_and_attributes(cfg, model)
    print(f"prompt: {prompt}")
    results = text2image(model, prompt, int(cfg.n), settings_from(cfg))
    return save_results(results, out, dicom=bool(cfg.dicom), view=infer_view(prompt, attributes),
                        device=str(model.device))


def run_inpaint(cfg: DictConfig, model: LoadedModel, out: Path) -> list[dict]:
    prepared = load_input_image(cfg.image, model.size, max_pixels=int(cfg.max_pixels or 0) or None)
    mask = inpaint_mask(prepared, mask=cfg.mask, box=cfg.box)
    prompt = build_prompt(model.metadata, "inpaint", prompt=cfg.prompt, attributes=attributes_from(cfg))
    print(f"prompt: {prompt}")
    results = inpaint(model, prepared.image, mask, prompt, int(cfg.n), settings_from(cfg), strength=float(cfg.strength))
    # the inputs by content hash, never by path: folder and file names can carry patient identity
    source = {"image": input_label(cfg.image), "mask": input_label(cfg.mask) if cfg.mask else "",
              "box": _box_text(cfg.box)}
    for result in results:
        result.params.update(source)
    save_png(mask, out / "mask.png", {"task": "inpaint_mask", **source})
    view = prepared.tags.get("view") or infer_view(prompt)
    return save_results(results, out, dicom=bool(cfg.dicom), view=view, device=str(model.device))


def run_full_flow(cfg: DictConfig, model: LoadedModel, out: Path) -> list[dict]:
    from mame_lightning.pipelines.full import run_full

    inpainter = load(cfg, cfg.inpaint_model_path)
    prompt, attributes = prompt_and_attributes(cfg, model)
    lesion_prompt = cfg.lesion_prompt or build_prompt(inpainter.metadata, "inpaint")
    print(f"prompt: {prompt}\nlesion prompt: {lesion_prompt}")
    return run_full(
        model, inpainter, prompt, out, n=int(cfg.n), settings=settings_from(cfg), lesion_prompt=lesion_prompt,
        box=cfg.box, lesion_box_size=float(cfg.lesion_box_size), category=str(cfg.lesion_category),
        birads=str(cfg.lesion_birads or ""), view=infer_view(prompt, attributes),
        density=attributes.get("density"), dicom=bool(cfg.dicom),
    )


def _box_text(box) -> str:
    if box is None:
        return ""
    return box if isinstance(box, str) else ",".join(f"{float(v):g}" for v in box)


def check_request(cfg: DictConfig) -> None:
    """Settings and the output folder, checked before a model is loaded or an image drawn."""
    check_range("n", cfg.n, 1, 100_000, whole=True)
    check_range("strength", cfg.strength, 0.01, 1.0)
    settings_from(cfg)  # steps, guidance, seed, batch_size, accelerate
    out = Path(str(cfg.out))
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is an existing file; give a folder (new or existing) for the images")


def run(cfg: DictConfig) -> list[dict]:
    """Load the model(s), generate, write the folder; returns the index rows (or findings for mode=full)."""
    check_request(cfg)
    model = load(cfg, cfg.model_path)
    mode = resolve_mode(cfg, model.task)
    out = Path(str(cfg.out))
    runner = {"text2image": run_text2image, "inpaint": run_inpaint, "full": run_full_flow}[mode]
    rows = runner(cfg, model, out)
    timings = json.loads((out / TIMINGS_FILE).read_text())
    print(f"wrote {len(rows)} {mode} image(s) to {out} ({timings['seconds_per_image']:.2f} s per image "
          f"on {timings['device']}; {TIMINGS_FILE}, images.csv)")
    return rows


# Errors caused by the command line or input files: reported in one line, without a traceback.
USER_ERRORS = (ModelNotFoundError, UnknownAttributeError, InputError, DicomError, ValueError)
