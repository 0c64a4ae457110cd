"""What each GUI action does: plain functions of the loaded models and the form's values.

Every endpoint of the app is one function here, called with an `AppContext` first and then the
form values in the order the UI wires them, so the tests can call them without a server. They
reuse the generation code of `mame_lightning.pipelines` (prompt building, seeded sampling, input
preparation, synthetic marking) and only add what a browser needs: files to download, outlines
to look at, and errors worded for the person at the form (`gr.Error`), never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np

from mame_lightning.app.images import (
    check_pixels,
    check_upload,
    editor_background,
    editor_mask,
    mask_bbox,
    outline_overlay,
)
from mame_lightning.app.storage import new_request_dir, prune
from mame_lightning.data.dicom import DicomError
from mame_lightning.io import write_text
from mame_lightning.pipelines.generation import GenerationSettings, inpaint, text2image
from mame_lightning.pipelines.inputs import InputError, PreparedInput, inpaint_mask, input_label, load_input_image
from mame_lightning.pipelines.loading import LoadedModel, ModelNotFoundError
from mame_lightning.pipelines.marking import save_dicom, save_png
from mame_lightning.pipelines.outputs import csv_text, save_result
from mame_lightning.pipelines.prompting import (
    ATTRIBUTE_LISTS,
    UnknownAttributeError,
    build_prompt,
    infer_view,
    known_values,
    validate_attributes,
)

log = logging.getLogger(__name__)

PROMPT_SOURCES = ("attributes", "free text")
ANY = ""  # dropdown value meaning "leave this attribute out of the prompt"
MAX_SEED = 2**32 - 1
MISSING_MODEL = {
    "text2image": "Text-to-image is off: the app was started without a text-to-image model. "
                  "Start it with model.text2image=EXPORT_DIR to enable generation.",
    "inpaint": "Inpainting is off: the app was started without an inpainting model. "
               "Start it with model.inpaint=EXPORT_DIR to enable inpainting.",
}
USER_ERRORS = (InputError, UnknownAttributeError, ModelNotFoundError, DicomError, ValueError)


@dataclass
class AppLimits:
    """Per-request limits that keep one user from exhausting the machine (conf/app.yaml, app.*)."""

    max_pixels: int = 40_000_000
    max_images: int = 8
    batch_size: int = 1
    keep_hours: float = 24.0


@dataclass
class AppContext:
    """The models loaded once at start, where request files go, and the limits."""

    text2image: LoadedModel | None
    inpainter: LoadedModel | None
    output_dir: Path
    limits: AppLimits = dataclasses.field(default_factory=AppLimits)
    example: Path | None = None

    def require(self, task: str) -> LoadedModel:
        model = self.text2image if task == "text2image" else self.inpainter
        if model is None:
            raise gr.Error(MISSING_MODEL[task], print_exception=False)
        return model

    def request_dir(self, kind: str) -> Path:
        """A fresh folder for one request's files; the app's folders older than keep_hours go first."""
        prune(self.output_dir, self.limits.keep_hours * 3600)
        return new_request_dir(self.output_dir, kind)


def readable_errors(fn):
    """Turn input problems into `gr.Error` (shown in the UI, sent to API clients); log anything else."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as exc:
            log.info("%s refused: %s", fn.__name__, exc)
            raise gr.Error(str(exc), print_exception=False) from exc
        except Exception as exc:
            import torch

            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
                raise gr.Error("out of GPU memory: ask for fewer images, or lower app.concurrency") from exc
            log.exception("%s failed", fn.__name__)
            raise gr.Error(f"unexpected error ({type(exc).__name__}: {exc}); the server log has the details",
                           print_exception=False) from exc

    return wrapper


# ------------------------------------------------------------------------------------ form values


def attribute_choices(model: LoadedModel | None) -> dict[str, list[tuple[str, str]]]:
    """Dropdown choices per attribute: "any" plus the values the model was trained on."""
    known = known_values(model.metadata) if model is not None else {name: [] for name in ATTRIBUTE_LISTS}
    return {name: [("any", ANY)] + [(value, value) for value in values] for name, values in known.items()}


def default_lesion_prompt(model: LoadedModel | None) -> str:
    return build_prompt(model.metadata, "inpaint") if model is not None else ""


def compose(model: LoadedModel, source: str, vendor, view, density, area, free_prompt) -> tuple[str, dict]:
    """The prompt and the validated attributes it came from (empty for free text)."""
    if source == "free text":
        text = str(free_prompt or "").strip()
        if not text:
            raise InputError("the free-text prompt is empty: type a prompt, or build it from attributes")
        return build_prompt(model.metadata, prompt=text), {}
    if source != "attributes":
        raise InputError(f"prompt source {source!r}: choose one of {', '.join(PROMPT_SOURCES)}")
    attributes = {"vendor": vendor, "view": view, "density": density, "area": area}
    return build_prompt(model.metadata, attributes=attributes), validate_attributes(attributes, model.metadata)


def pick_seed(seed, random_seed: bool) -> int:
    if random_seed:
        return secrets.randbelow(MAX_SEED)
    value = int(seed or 0)
    if not 0 <= value <= MAX_SEED:
        raise InputError(f"seed {value}: use a whole number from 0 to {MAX_SEED}")
    return value


def make_settings(ctx: AppContext, guidance, steps, negative, seed: int) -> GenerationSettings:
    return GenerationSettings(guidance=float(guidance), steps=int(steps), negative_prompt=str(negative or "") or None,
                              seed=seed, batch_size=ctx.limits.batch_size, progress=False)


def with_scheduler(model: LoadedModel, name: str) -> LoadedModel:
    """A per-request view of `model` with its own scheduler object around the shared weights.

    Schedulers keep per-call state (timesteps), so two requests must never share one.
    """
    pipe = model.pipe
    fresh = type(pipe)(**{**pipe.components, "safety_checker": None}, requires_safety_checker=False)
    fresh.set_progress_bar_config(disable=True)
    copy = dataclasses.replace(model, pipe=fresh)
    copy.set_scheduler(str(name or model.scheduler))
    return copy


def editor_value(path: Path | str) -> dict:
    """An ImageEditor value with `path` as background and nothing drawn."""
    return {"background": str(path), "layers": [], "composite": str(path)}


# --------------------------------------------------------------------------------------- generate


@readable_errors
def compose_prompt(ctx: AppContext, source, vendor, view, density, area, free_prompt) -> str:
    return compose(ctx.require("text2image"), source, vendor, view, density, area, free_prompt)[0]


@readable_errors
def generate(ctx: AppContext, source, vendor, view, density, area, free_prompt, negative, guidance, steps, seed,
             random_seed, n, scheduler, dicom):
    """Text-to-image: (gallery items, prompt, seed used, files to download)."""
    model = ctx.require("text2image")
    prompt, attributes = compose(model, source, vendor, view, density, area, free_prompt)
    count = int(n or 1)
    if not 1 <= count <= ctx.limits.max_images:
        raise InputError(f"{count} images: ask for 1 to {ctx.limits.max_images} (app.max_images)")
    seed = pick_seed(seed, random_seed)
    results = text2image(with_scheduler(model, scheduler), prompt, count, make_settings(ctx, guidance, steps, negative, seed))
    out = ctx.request_dir("generate")
    rows = [save_result(r, out, dicom=bool(dicom), view=infer_view(prompt, attributes)) for r in results]
    gallery = [(str(out / row["file"]), f"seed {result.seed}") for row, result in zip(rows, results)]
    files = [str(out / row[key]) for row in rows for key in ("file", "dicom_file") if row.get(key)]
    return gallery, prompt, seed, files


# ---------------------------------------------------------------------------------------- inpaint


def prepare_file(path: Path, size: int, max_pixels: int | None = None) -> PreparedInput:
    """`load_input_image`, with messages naming the file the user chose rather than its temp path."""
    try:
        return load_input_image(path, size, max_pixels)
    except (InputError, DicomError) as exc:
        raise InputError(str(exc).replace(str(path), path.name)) from exc


def input_image(ctx: AppContext, upload, editor, size: int, out: Path) -> PreparedInput:
    """The image to inpaint at the model's size: the uploaded file, else the editor's background."""
    if upload:
        return prepare_file(check_upload(upload, ctx.limits.max_pixels), size, ctx.limits.max_pixels)
    background = editor_background(editor)
    if background is None:
        raise InputError("no image: upload a PNG or DICOM, load the example, or send a generated image here")
    check_pixels("the editor image", background.shape[1], background.shape[0], ctx.limits.max_pixels)
    return prepare_file(save_png(background, out / "input.png", {"task": "inpaint_input"}), size)


def region_mask(prepared: PreparedInput, editor, box, out: Path) -> tuple[np.ndarray, str]:
    """The region to repaint (uint8 0/255): the brush strokes, the typed box, or both together."""
    parts, described = [], []
    brush = editor_mask(editor)
    if brush is not None:
        parts.append(inpaint_mask(prepared, mask=save_png(brush, out / "brush.png", {"task": "brush"})))
        described.append("brush")
    if box is not None and str(box).strip():
        parts.append(inpaint_mask(prepared, box=str(box)))
        described.append(f"box {str(box).strip()}")
    if not parts:
        raise InputError("no mask drawn: brush over the region to repaint, or type a box as x0,y0,x1,y1")
    return np.maximum.reduce(parts), " + ".join(described)


@readable_errors
def load_image(ctx: AppContext, upload):
    """An uploaded PNG/DICOM prepared to the inpainting model's size, as the editor background."""
    model = ctx.require("inpaint")
    path = check_upload(upload, ctx.limits.max_pixels)
    prepared = prepare_file(path, model.size, ctx.limits.max_pixels)
    out = ctx.request_dir("upload")
    shown = save_png(prepared.image, out / "prepared.png", {"task": "inpaint_input", "image": input_label(path)})
    how = "as is" if prepared.geometry is None else "resized and centre-cropped" + (
        ", right breast flipped" if getattr(prepared.geometry, "flip", False) else "")
    return editor_value(shown), f"{path.name}: prepared to {model.size}x{model.size} px ({how}). Brush the lesion region."


@readable_errors
def load_example(ctx: AppContext):
    """The bundled phantom as if it had been uploaded."""
    ctx.require("inpaint")
    if ctx.example is None:
        raise InputError("no example image in this app (app.example=false)")
    editor, info = load_image(ctx, str(ctx.example))
    return str(ctx.example), editor, info


@readable_errors
def inpaint_lesion(ctx: AppContext, upload, editor, box, prompt, negative, guidance, steps, seed, random_seed,
                   scheduler, dicom):
    """Paint a lesion: (input with outline, result with outline, files to download, seed used)."""
    model = ctx.require("inpaint")
    out = ctx.request_dir("inpaint")
    prepared = input_image(ctx, upload, editor, model.size, out)
    mask, region = region_mask(prepared, editor, box, out)
    prompt = str(prompt or "").strip() or default_lesion_prompt(model)
    seed = pick_seed(seed, random_seed)
    settings = make_settings(ctx, guidance, steps, negative, seed)
    result = inpaint(with_scheduler(model, scheduler), prepared.image, mask, prompt, 1, settings)[0]
    result.params.update({"image": input_label(prepared.source), "region": region})
    view = prepared.tags.get("view") or infer_view(prompt)
    row = save_result(result, out, dicom=bool(dicom), view=view, name=f"inpaint_seed{seed}")
    mask_file = save_png(mask, out / f"inpaint_seed{seed}_mask.png", {**result.params, "task": "inpaint_mask"})
    files = [str(out / row["file"]), str(mask_file)] + ([str(out / row["dicom_file"])] if dicom else [])
    return outline_overlay(prepared.image, mask), outline_overlay(result.image, mask), files, seed


@readable_errors
def send_to_inpaint(ctx: AppContext, gallery, selected):
    """The chosen generated image as the inpainting input (clears any upload)."""
    ctx.require("inpaint")
    items = list(gallery or [])
    if not items:
        raise InputError("nothing generated yet: generate an image first")
    index = int(selected or 0) if 0 <= int(selected or 0) < len(items) else 0
    item = items[index]
    path = item[0] if isinstance(item, (tuple, list)) else item
    return None, editor_value(path), "Generated image loaded. Brush the lesion region."


# ---------------------------------------------------------------------------------- full pipeline

FINDING_CATEGORIES = ["Mass", "Suspicious Calcification", "Asymmetry", "Focal Asymmetry", "Architectural Distortion",
                      "Suspicious Lymph Node", "Skin Thickening", "Nipple Retraction", "Other"]
FINDING_BIRADS = ["", "BI-RADS 2", "BI-RADS 3", "BI-RADS 4", "BI-RADS 5"]


@readable_errors
def full_generate(ctx: AppContext, source, vendor, view, density, area, free_prompt, negative, guidance, steps, seed,
                  random_seed, scheduler):
    """Step 1 of the full flow: a healthy mammogram as the editor background, (editor, prompt, seed, state)."""
    model = ctx.require("text2image")
    ctx.require("inpaint")
    prompt, attributes = compose(model, source, vendor, view, density, area, free_prompt)
    seed = pick_seed(seed, random_seed)
    healthy = text2image(with_scheduler(model, scheduler), prompt, 1, make_settings(ctx, guidance, steps, negative, seed))[0]
    out = ctx.request_dir("full")
    path = save_png(healthy.image, out / f"healthy_seed{seed}.png", healthy.params)
    state = {"healthy": str(path), "params": healthy.params, "seed": seed, "folder": str(out),
             "view": infer_view(prompt, attributes), "density": attributes.get("density")}
    return editor_value(path), prompt, seed, state


@readable_errors
def full_inpaint(ctx: AppContext, state, editor, box, lesion_prompt, category, birads, negative, guidance, steps,
                 scheduler, dicom):
    """Step 2: paint the lesion into the healthy image; (result with outline, files, annotation rows)."""
    from mame_lightning.pipelines.full import FINDING_COLUMNS, _full_params, finding_row

    model = ctx.require("inpaint")
    state = dict(state or {})
    if not state.get("healthy") or not Path(state["healthy"]).is_file():
        raise InputError("no healthy image yet: generate one first (step 1)")
    out = Path(state["folder"])
    prepared = prepare_file(Path(state["healthy"]), model.size)
    mask, region = region_mask(prepared, editor, box, out)
    seed = int(state.get("seed", 0))
    prompt = str(lesion_prompt or "").strip() or default_lesion_prompt(model)
    painted = inpaint(with_scheduler(model, scheduler), prepared.image, mask, prompt, 1,
                      make_settings(ctx, guidance, steps, negative, seed))[0]
    lesion_box = mask_bbox(mask, str(category or "Mass"))
    params = {**_full_params(state.get("params") or {}, painted.params, lesion_box, seed), "region": region}
    image_id = f"lesion_{out.name.rsplit('-', 1)[-1]}_seed{seed}"  # short: the request folder's random part
    image_file = save_png(painted.image, out / f"{image_id}.png", params)
    mask_file = save_png(mask, out / f"{image_id}_mask.png", {**params, "task": "mask"})
    row = finding_row(image_id, lesion_box, prepared.size, view=state.get("view"), density=state.get("density"),
                      birads=str(birads or ""))
    csv_file = write_text(out / f"{image_id}_finding_annotations.csv", csv_text([row], FINDING_COLUMNS))
    files = [str(image_file), str(mask_file), str(csv_file)]
    if dicom:
        files.append(str(save_dicom(painted.image, out / f"{image_id}.dcm", params, view=state.get("view"))))
    table = {"headers": FINDING_COLUMNS, "data": [[row[c] for c in FINDING_COLUMNS]]}
    return outline_overlay(painted.image, mask), files, table


__all__ = ["AppContext", "AppLimits", "MISSING_MODEL", "PROMPT_SOURCES", "FINDING_CATEGORIES", "FINDING_BIRADS",
           "attribute_choices", "default_lesion_prompt", "compose", "compose_prompt", "generate", "load_image",
           "load_example", "inpaint_lesion", "send_to_inpaint", "full_generate", "full_inpaint", "readable_errors",
           "with_scheduler", "editor_value"]
