"""Turn attributes (vendor, view, density, area) into the prompt a model was trained with.

A model only understands the attribute values its training prompts used, and the prompt must be
phrased with its own template; both are in the exported folder's `mame_lightning.json`. Values
are matched case-insensitively and written back in the model's spelling, and density also
accepts BI-RADS letters ("C" -> "high"), so `density=C` and `density=high` give the same prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# attribute -> key of its value list in mame_lightning.json "attributes"
ATTRIBUTE_LISTS = {"vendor": "vendors", "view": "views", "density": "densities", "area": "areas"}
# Used when a folder carries no sidecar: the MAM-E text-to-image phrasing.
DEFAULT_TEMPLATES = {
    "text2image": "a {vendor} mammogram in {view} view with {density} density and {area} area",
    "inpaint": "a mammogram with a lesion",
}
VIEW_PATTERN = re.compile(r"\b(XCCL|XCCM|MLO|LMO|CC|ML|LM|SIO|ISO|FB)\b", re.IGNORECASE)


class UnknownAttributeError(ValueError):
    """An attribute value the model was not trained on (the message lists the ones it knows)."""


def model_template(metadata: Mapping, task: str) -> str:
    """The prompt template the model was trained with for `task`."""
    templates = dict(metadata.get("templates") or {})
    return str(templates.get(task) or DEFAULT_TEMPLATES[task])


def known_values(metadata: Mapping) -> dict[str, list[str]]:
    """Attribute values seen in training, by attribute name (empty lists when unrecorded)."""
    recorded = dict(metadata.get("attributes") or {})
    return {name: [str(v) for v in recorded.get(key) or [] if v is not None] for name, key in ATTRIBUTE_LISTS.items()}


def _density_candidates(value: str) -> list[str]:
    """The value itself plus its density word when it is a BI-RADS letter or "DENSITY C"."""
    from mame_lightning.data.prompts import DENSITY_WORDS, density_word

    try:
        word = density_word(value, DENSITY_WORDS)
    except ValueError:  # not a letter: the value is checked against the model's words as it is
        return [value]
    return [value] + ([word] if word and word != value else [])


def normalise_attribute(name: str, value, known: list[str], template: str) -> str:
    """`value` in the model's own spelling; raises UnknownAttributeError naming what it knows."""
    if name not in ATTRIBUTE_LISTS:
        raise UnknownAttributeError(f"unknown attribute {name!r}; prompts are built from {', '.join(ATTRIBUTE_LISTS)}")
    if "{" + name + "}" not in template:
        raise UnknownAttributeError(
            f"{name}={value!r}: this model's prompt template {template!r} has no {{{name}}} slot, "
            f"so it was not trained with {name} in its prompts"
        )
    text = str(value).strip()
    candidates = _density_candidates(text) if name == "density" else [text]
    if not known:  # nothing recorded: trust the caller
        return candidates[-1]
    by_lower = {k.lower(): k for k in known}
    for candidate in candidates:
        if candidate.lower() in by_lower:
            return by_lower[candidate.lower()]
    raise UnknownAttributeError(
        f"unknown {name} {text!r}: this model was trained on {name} values {', '.join(repr(k) for k in known)}"
    )


def validate_attributes(attributes: Mapping, metadata: Mapping, task: str = "text2image") -> dict[str, str]:
    """Attributes given (None values dropped) checked against the model and normalised."""
    template = model_template(metadata, task)
    known = known_values(metadata)
    given = {k: v for k, v in attributes.items() if v is not None and str(v).strip() != ""}
    return {name: normalise_attribute(name, value, known.get(name, []), template) for name, value in given.items()}


def build_prompt(metadata: Mapping, task: str = "text2image", *, prompt: str | None = None,
                 attributes: Mapping | None = None) -> str:
    """Free text when given, else the model's template filled from validated attributes.

    Giving both is refused: silently ignoring one of them would hide a mistake.
    """
    attributes = {k: v for k, v in (attributes or {}).items() if v is not None and str(v).strip() != ""}
    if prompt:
        if attributes:
            raise ValueError(
                f"give either prompt= or attributes ({', '.join(f'{k}={v}' for k, v in attributes.items())}), not both"
            )
        return str(prompt)
    from mame_lightning.data.prompts import render_prompt

    values = validate_attributes(attributes, metadata, task)
    slots = {name: values.get(name) for name in ATTRIBUTE_LISTS}
    return render_prompt(model_template(metadata, task), slots)


def infer_view(prompt: str | None, attributes: Mapping | None = None) -> str | None:
    """The mammographic view an image was asked for: the attribute, else a view word in the prompt."""
    view = (attributes or {}).get("view")
    if view:
        return str(view).upper()
    match = VIEW_PATTERN.search(prompt or "")
    return match.group(1).upper() if match else None


__all__ = [
    "ATTRIBUTE_LISTS", "DEFAULT_TEMPLATES", "UnknownAttributeError", "model_template", "known_values",
    "normalise_attribute", "validate_attributes", "build_prompt", "infer_view",
]
