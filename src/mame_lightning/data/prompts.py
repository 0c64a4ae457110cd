"""Text prompts from image attributes, and the breast-density vocabulary they use.

A template such as "a {vendor} mammogram in {view} view with {density} density and {area} area"
is split into a head ("a {vendor} mammogram") and connective phrases ("in ...", "with ...",
"and ..."). A missing attribute removes its phrase; "and" phrases belong to the phrase they
extend, so when the first one of a chain goes, the next one takes over its connective
("with {density} density and {area} area" without density gives "with big area").
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Mapping

DENSITY_WORDS: dict[str, str] = {"A": "very low", "B": "low", "C": "high", "D": "very high"}
PROMPT_FIELDS = ("view", "density", "area", "vendor")
CONNECTIVES = frozenset({"with", "and", "in", "of", "at", "on", ","})

_TOKEN = re.compile(r"(\s*)(\{\w*\}|,|[^\s,{]+|\{)")
_DENSITY = re.compile(r"^(?:(?:BI-?RADS|DENSITY|BREAST\s*DENSITY)[\s_\-:]*)?([A-D])$")


def density_letter(text: Any) -> str | None:
    """'A'..'D' from 'A', 'a', 'DENSITY A', 'density-a', 'density_a'; None for None/''/NaN."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    cleaned = str(text).strip().upper()
    if not cleaned or cleaned in ("NAN", "NONE", "NULL"):
        return None
    match = _DENSITY.match(cleaned)
    if not match:
        raise ValueError(f"not a breast density category: {text!r} (expected A-D, e.g. 'DENSITY A')")
    return match.group(1)


def density_word(text: Any, words: Mapping[str, str] = DENSITY_WORDS) -> str | None:
    """The prompt word for a density ('DENSITY C' -> 'high'); a word already in `words` passes."""
    if isinstance(text, str) and text.strip().lower() in {w.lower() for w in words.values()}:
        return text.strip().lower()
    letter = density_letter(text)
    return None if letter is None else words[letter]


def template_fields(template: str) -> list[str]:
    """Placeholder names of a template, in order of first appearance."""
    names: list[str] = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None and field not in names:
            names.append(field)
    return names


def render_prompt(template: str, attrs: Mapping[str, Any]) -> str:
    """Fill the template; a None/'' attribute removes its phrase and any dangling connective."""
    unknown = [f for f in template_fields(template) if f not in attrs and f not in PROMPT_FIELDS]
    if unknown:
        raise ValueError(f"template {template!r} uses unknown placeholders {unknown}")
    values = {name: _value(attrs.get(name)) for name in template_fields(template)}
    head, groups = _split(_tokens(template))
    kept = _render_head(head, values)
    for group in groups:
        kept.extend(_render_group(group, values))
    return _join(kept, values)


def _value(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _tokens(template: str) -> list[tuple[str, bool]]:
    """(token, preceded_by_space) pairs: placeholders, commas and words."""
    return [(m.group(2), bool(m.group(1))) for m in _TOKEN.finditer(template)]


def _field(token: str) -> str | None:
    return token[1:-1] if token.startswith("{") and token.endswith("}") and len(token) > 2 else None


def _split(tokens: list[tuple[str, bool]]):
    """Head tokens, then groups: each group is a list of clauses (a connective + its words)."""
    head: list[tuple[str, bool]] = []
    groups: list[list[list[tuple[str, bool]]]] = []
    for token in tokens:
        if token[0].lower() in CONNECTIVES:
            if token[0].lower() == "and" and groups:
                groups[-1].append([token])
            else:
                groups.append([[token]])
        elif groups:
            groups[-1][-1].append(token)
        else:
            head.append(token)
    return head, groups


def _render_head(head, values):
    """Head placeholders are adjectives: drop an empty one (and its own noun, '{view} view')."""
    kept, skip_noun = [], None
    for token, space in head:
        if skip_noun is not None and token.lower() == skip_noun:
            skip_noun = None
            continue
        skip_noun = None
        field = _field(token)
        if field is not None and values.get(field) is None:
            skip_noun = field.lower()
            continue
        kept.append((token, space))
    return kept


def _render_group(group, values):
    complete = [c for c in group if all(values.get(_field(t)) is not None for t, _ in c if _field(t))]
    if not complete:
        return []
    first = [group[0][0]] + complete[0][1:]  # the chain's own connective leads
    out = list(first)
    for clause in complete[1:]:
        out.extend(clause)
    return out


def _join(tokens, values) -> str:
    parts: list[str] = []
    for token, space in tokens:
        field = _field(token)
        text = values[field] if field is not None else token
        if parts and space and token != ",":
            parts.append(" ")
        parts.append(text)
    return re.sub(r"\s+", " ", "".join(parts)).strip(" ,")


__all__ = [
    "DENSITY_WORDS",
    "PROMPT_FIELDS",
    "density_letter",
    "density_word",
    "template_fields",
    "render_prompt",
]
