"""The README.md of an exported model, in the Hugging Face model-card format.

The YAML front matter is what the Hub indexes (license, base model, library, pipeline tag, tags);
the body tells the next reader what the model was trained on and how, which prompts it accepts,
what it measured, what it is for, and how its images mark themselves synthetic. Everything comes
from the export's own `mame_lightning.json` contents, so a card never disagrees with its sidecar.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

from mame_lightning import __version__
from mame_lightning.data.prompts import render_prompt, template_fields
from mame_lightning.io import write_text

CARD_FILE = "README.md"
SD15_LICENSE = "creativeml-openrail-m"  # the Stable Diffusion v1.5 weights' licence binds derived weights
OWN_LICENSE = "apache-2.0"  # weights trained from scratch by this project's code
# Hub ids (by prefix) whose weights carry another licence than SD v1.5's
BASE_LICENSES = {"stabilityai/stable-diffusion-2": "openrail++"}
PIPELINE_TAGS = {"text2image": "text-to-image", "inpaint": "image-to-image", "autoencoder": "image-to-image",
                 "unconditional": "unconditional-image-generation"}
BASE_TAGS = ["diffusers", "stable-diffusion", "stable-diffusion-diffusers", "mammography", "medical-imaging",
             "synthetic-data", "mame_lightning"]
TASK_TAGS = {"text2image": ["text-to-image"], "inpaint": ["inpainting", "image-to-image"], "autoencoder": ["vae"],
             "unconditional": ["unconditional-image-generation", "ddpm"]}
# template placeholder -> key of its value list in the sidecar's "attributes"
FIELD_LISTS = {"vendor": "vendors", "view": "views", "density": "densities", "area": "areas"}
MAX_EXAMPLES = 4


def base_model_of(train_config: Mapping) -> str | None:
    """The Hub id the run started from: the model config's `path` when it names a Hub repository."""
    model = dict(train_config.get("model") or {})
    path = model.get("path")
    if not path or not str(model.get("_target_", "")).endswith("load_components"):
        return None
    path = str(path)
    if Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        return None  # a local folder: its origin is not known here (set export.base_model)
    return path


def default_license(train_config: Mapping, base_model: str | None) -> str:
    model_target = str((train_config.get("model") or {}).get("_target_", ""))
    for prefix, licence in BASE_LICENSES.items():
        if base_model and base_model.startswith(prefix):
            return licence
    return SD15_LICENSE if base_model or model_target.endswith("load_components") else OWN_LICENSE


def effective_batch(trainer: Mapping, batch_size) -> int | None:
    """Images per optimizer step: batch × accumulation × devices × nodes (None when devices is 'auto')."""
    devices = trainer.get("devices", 1)
    devices = len(devices) if isinstance(devices, (list, tuple)) else devices
    parts = [batch_size, trainer.get("accumulate_grad_batches", 1), devices, trainer.get("num_nodes", 1)]
    if not all(isinstance(p, int) for p in parts):
        return None
    total = 1
    for part in parts:
        total *= part
    return total


def example_prompts(template: str, attributes: Mapping, limit: int = MAX_EXAMPLES) -> list[str]:
    """Up to `limit` prompts filling the template with trained values, spread over the combinations."""
    fields = [f for f in template_fields(template) if f in FIELD_LISTS]
    choices = [list(attributes.get(FIELD_LISTS[f]) or [None]) for f in fields]
    combos = [dict(zip(fields, values)) for values in itertools.product(*choices)]
    if len(combos) > limit:  # first, last and evenly between
        combos = [combos[round(i * (len(combos) - 1) / (limit - 1))] for i in range(limit)]
    prompts = [render_prompt(template, combo) for combo in combos]
    return list(dict.fromkeys(prompts))


def card_metadata(metadata: Mapping, *, license: str | None = None, base_model: str | None = None) -> dict:
    """The YAML front matter as a plain dict (huggingface_hub.ModelCardData keys)."""
    train_config = dict(metadata.get("train_config") or {})
    task = metadata.get("task") or "text2image"
    base = base_model or base_model_of(train_config)
    data = {
        "license": license or default_license(train_config, base),
        "library_name": "diffusers",
        "pipeline_tag": PIPELINE_TAGS.get(task, "text-to-image"),
        "tags": BASE_TAGS + TASK_TAGS.get(task, []) + (["lora"] if metadata.get("lora") else []),
    }
    if base:
        data["base_model"] = base
    return data


def _table(header: tuple[str, str], rows: list[tuple]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return lines + [f"| {a} | {b} |" for a, b in rows if b not in (None, "")]


def _recipe(metadata: Mapping) -> list[str]:
    cfg = dict(metadata.get("train_config") or {})
    dataset, trainer = dict(cfg.get("dataset") or {}), dict(cfg.get("trainer") or {})
    optimizer, precision = dict(cfg.get("optimizer") or {}), dict(cfg.get("precision") or {})
    counts = dict(metadata.get("data_counts") or {})
    rows = [
        ("dataset", dataset.get("name")),
        ("task", metadata.get("task")),
        ("training images", counts.get("train")),
        ("prepared images", counts.get("prepared")),
        ("validation images", counts.get("val")),
        ("image size", f"{metadata['prepare_size']} px" if metadata.get("prepare_size") else None),
        ("optimizer steps", trainer.get("max_steps")),
        ("batch size", dataset.get("batch_size")),
        ("gradient accumulation", trainer.get("accumulate_grad_batches")),
        ("effective batch", effective_batch(trainer, dataset.get("batch_size"))),
        ("learning rate", optimizer.get("lr")),
        ("optimizer", str(optimizer.get("_target_", "")).rsplit(".", 1)[-1] or None),
        ("precision", precision.get("lightning")),
        ("EMA weights", "yes" if metadata.get("ema_weights") else "no"),
        ("LoRA", _lora_row(metadata.get("lora"))),
        ("seed", cfg.get("seed")),
    ]
    lines = ["## Training recipe", "", *_table(("setting", "value"), rows)]
    by_attribute = dict(counts.get("by_attribute") or {})
    if any(by_attribute.values()):
        scope = "prepared" if counts.get("by_attribute_scope") == "prepared" else "training"
        lines += ["", f"Images per attribute value ({scope} images):", "", "| attribute | images per value |",
                  "|---|---|"]
        for name, values in by_attribute.items():
            if values:
                lines.append(f"| {name} | " + ", ".join(f"{v}: {n}" for v, n in values.items()) + " |")
    return lines


def _lora_row(lora: Mapping | None) -> str | None:
    if not lora:
        return None
    parts = " and ".join(part.replace("_", " ") for part in ("unet", "text_encoder") if lora.get(part))
    how = "merged into the weights" if lora.get("merged") else f"adapters in `{lora.get('weights')}`"
    return f"rank {lora.get('rank')}, alpha {lora.get('alpha'):g} on the {parts}; {how}"


def _prompts(metadata: Mapping) -> list[str]:
    templates = dict(metadata.get("templates") or {})
    attributes = dict(metadata.get("attributes") or {})
    task = metadata.get("task")
    lines = ["## Prompts", ""]
    template = templates.get(task) if task in ("text2image", "inpaint") else None
    if not template:
        return lines + [f"This export is not prompted by attributes (task: {task})."]
    lines += [f"Template: `{template}`", ""]
    fields = [f for f in template_fields(template) if f in FIELD_LISTS]
    for field in fields:
        values = attributes.get(FIELD_LISTS[field]) or []
        lines.append(f"- `{{{field}}}`: " + (", ".join(f"`{v}`" for v in values) or "(not recorded)"))
    if not fields:
        lines.append("The template has no attribute slots.")
    lines += ["", "Example prompts:", ""]
    lines += [f"- `{prompt}`" for prompt in example_prompts(template, attributes)]
    return lines


def _metrics(metrics: Mapping | None) -> list[str]:
    values = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    if not values:
        return ["## Metrics", "", "No metrics were recorded with this export."]
    rows = [(name, f"{value:.6g}" if isinstance(value, float) else value) for name, value in values.items()]
    return ["## Metrics", "", *_table(("metric", "value"), rows)]


def _usage(metadata: Mapping) -> list[str]:
    if metadata.get("task") == "unconditional":
        return ["## How to use", "", "```python", "from diffusers import DDPMPipeline", "",
                'pipe = DDPMPipeline.from_pretrained("THIS_FOLDER_OR_REPO")',
                "image = pipe(batch_size=1, num_inference_steps=1000).images[0]", "```"]
    inpaint = metadata.get("task") == "inpaint"
    pipeline = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
    call = ('pipe(prompt, image=image, mask_image=mask).images[0]' if inpaint
            else 'pipe(prompt, guidance_scale=4, num_inference_steps=24).images[0]')
    return [
        "## How to use", "",
        "```python", f"from diffusers import {pipeline}", "",
        f'pipe = {pipeline}.from_pretrained("THIS_FOLDER_OR_REPO", safety_checker=None)',
        *(['pipe.load_lora_weights("THIS_FOLDER_OR_REPO")  # the LoRA adapters over the base pipeline']
          if (metadata.get("lora") or {}).get("weights") else []),
        f"image = {call}", "```", "",
        "or `python -m mame_lightning.generate model_path=THIS_FOLDER prompt=\"...\" n=8 out=DIR`, which marks "
        "every image as described below.",
    ]


INTENDED_USE = [
    "## Intended use", "",
    "Research only: synthetic mammograms for data augmentation, method development, education and studies of "
    "generative models in medical imaging. **Not for diagnosis, screening, treatment decisions or any clinical "
    "use**, and not a substitute for real patient data in the validation of clinical tools. The images depict no "
    "patient; they can reproduce biases and artefacts of the training data, and attribute control (view, density, "
    "area, vendor) is only as good as the training labels.",
]
MARKING = [
    "## Synthetic marking", "",
    "Images written by mame_lightning say what they are in the file itself: PNG text chunks `synthetic=true` "
    "with `prompt`, `negative_prompt`, `seed`, `guidance`, `steps`, `scheduler`, `model` and `task`; the optional "
    "DICOM copy is a Secondary Capture object with ConversionType `SYN` (Synthetic Image), new UIDs, PatientName "
    "`SYNTHETIC^IMAGE`, no patient identity, and DerivationDescription/ImageComments stating that it is a "
    "synthetic image and from which prompt. Images produced by calling the diffusers pipeline directly carry no "
    "such marks: mark them yourself before sharing.",
]


def _origin(metadata: Mapping, base: str | None) -> str:
    """One sentence on what was trained from what, and what the prompts control."""
    model = str((metadata.get("train_config") or {}).get("model", {}).get("_target_", ""))
    start = (f"{base} fine-tuned" if base else "Stable Diffusion fine-tuned" if model.endswith("load_components")
             else "a small Stable Diffusion-architecture model trained from scratch")
    if metadata.get("task") == "unconditional":
        start = "an unconditional pixel-space DDPM (diffusers UNet2DModel) trained from scratch"
    template = dict(metadata.get("templates") or {}).get(metadata.get("task"), "")
    fields = [f for f in template_fields(template) if f in FIELD_LISTS] if template else []
    control = f", its prompts controlling {', '.join(fields)}" if fields else ""
    return f"{start} the MAM-E way on full-field digital mammograms{control}"


def model_card_text(metadata: Mapping, *, metrics: Mapping | None = None, license: str | None = None,
                    base_model: str | None = None) -> str:
    """README.md text: YAML front matter (huggingface_hub.ModelCardData) and the body."""
    from huggingface_hub import ModelCardData

    front = card_metadata(metadata, license=license, base_model=base_model)
    data = ModelCardData(**front)
    task = metadata.get("task") or "text2image"
    dataset = (metadata.get("train_config") or {}).get("dataset", {}).get("name", "")
    body = [
        f"# Synthetic mammography: {task} ({dataset or 'unnamed dataset'})", "",
        f"A diffusers pipeline exported by mame_lightning {__version__} on {metadata.get('created', '')}: "
        f"{_origin(metadata, front.get('base_model'))}. It generates **synthetic** images.", "",
        *_recipe(metadata), "", *_prompts(metadata), "", *_metrics(metrics), "", *_usage(metadata), "",
        *INTENDED_USE, "", *MARKING, "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_model_card(folder: Path, metadata: Mapping, **options) -> Path:
    return write_text(Path(folder) / CARD_FILE, model_card_text(metadata, **options))


__all__ = ["CARD_FILE", "base_model_of", "card_metadata", "example_prompts", "effective_batch", "model_card_text",
           "write_model_card"]
