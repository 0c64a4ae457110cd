"""Which images enter a prepared set: MAM-E's selection rules, each one switchable.

MAM-E trains on standard screening views only: digital mammograms (Modality MG) meant for
display (FOR PRESENTATION), CC and MLO views without spot compression or magnification, no
breast implants, no special protocols, one vendor per set. Every rule returns a short ``kind``
(counted in the report) and a readable reason, or nothing when the image passes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mame_lightning.data.dicom import tag_metadata
from mame_lightning.data.records import ImageRecord

# View modifiers (CID 4015) that make an image a diagnostic work-up view, not a screening one.
WORKUP_MODIFIERS = ("spot", "magnif")
# Words in a header's protocol descriptions that mark a special (non-screening) acquisition.
SPECIAL_PROTOCOL_WORDS = ("MAG", "MAGNIFICATION", "MAGNIFIED", "BIOPSY", "STEREO", "STEREOTACTIC",
                          "SPECIMEN", "LOCALISATION", "LOCALIZATION")
# Where the header describes the protocol: standard attributes, and Hologic's field-of-view type
# (private (0019,1039), e.g. 2D_CONTACT, 2D_MAGNIFICATION, 2D_BIOPSY).
PROTOCOL_KEYWORDS = ("SeriesDescription", "ProtocolName", "PerformedProcedureStepDescription",
                     "RequestedProcedureDescription", "AcquisitionDeviceProcessingDescription")
HOLOGIC_FOV_TYPE = 0x00191039


def part_of(source: str) -> str:
    """First component of a record's source path: the part of a combined set it came from."""
    return source.split("/", 1)[0]


def view_modifiers(ds) -> list[str]:
    """Code meanings of the view modifiers of a DICOM image (spot compression, magnification...)."""
    meanings = []
    for holder in [ds, *(ds.get("ViewCodeSequence") or [])]:
        for item in holder.get("ViewModifierCodeSequence") or []:
            meaning = str(item.get("CodeMeaning", "") or "").strip()
            if meaning:
                meanings.append(meaning)
    return meanings


def _text_of(element) -> str:
    value = getattr(element, "value", element)
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    return str(value or "")


def special_protocol(ds) -> str | None:
    """The header description naming a special protocol (magnification, biopsy, ...), else None."""
    texts = []
    for keyword in PROTOCOL_KEYWORDS:
        try:
            texts.append(_text_of(ds.get(keyword)))
        except Exception:  # noqa: BLE001 - a malformed optional element reads as absent
            continue
    if HOLOGIC_FOV_TYPE in ds:
        texts.append(_text_of(ds[HOLOGIC_FOV_TYPE]))
    for text in texts:
        if set(re.split(r"[^A-Z]+", text.upper())) & set(SPECIAL_PROTOCOL_WORDS):
            return text.strip()
    return None


def image_tags(ds) -> dict:
    """Everything the filters read from a DICOM header (a file's or one from a JSON header)."""
    return {**tag_metadata(ds), "view_modifiers": view_modifiers(ds), "special_protocol": special_protocol(ds)}


def merge_attributes(record: ImageRecord, tags: Mapping) -> dict:
    """Record fields where the source set them, DICOM tags for the rest."""

    def pick(record_value, tag_key):
        return record_value if record_value is not None else tags.get(tag_key)

    view = pick(record.view, "view")
    laterality = pick(record.laterality, "laterality")
    return {
        "view": str(view).strip().upper() if view else None,
        "laterality": str(laterality).strip().upper()[:1] if laterality else None,
        "manufacturer": pick(record.manufacturer, "manufacturer"),
        "modality": tags.get("modality"),
        "presentation_intent": tags.get("presentation_intent"),
        # Either the annotation or the tag saying "implant" is enough to leave an image out.
        "implant": bool(record.implant) or bool(tags.get("implant")),
        "special_protocol": pick(record.special_protocol, "special_protocol"),
        "view_modifiers": list(tags.get("view_modifiers") or []),
        "part": part_of(record.source),
    }


def _allowed(values) -> set[str] | None:
    if values is None or values is False:
        return None
    if isinstance(values, str):
        values = [values]
    allowed = {str(v).strip().upper() for v in values}
    return allowed or None


def vendor_for(part: str, setting) -> set[str] | None:
    """Allowed vendors for an image of ``part``: a name, a list, or a mapping part -> name(s)."""
    if isinstance(setting, Mapping):
        setting = setting.get(part, setting.get("*"))
    allowed = _allowed(setting)
    return {v.lower() for v in allowed} if allowed else None


def unlocalised_reason(record: ImageRecord) -> tuple[str, str] | None:
    """A lesion image without any box can serve neither task: not healthy, no mask to inpaint."""
    findings = record.extra.get("unlocalised_findings")
    if findings and not record.boxes:
        kind = str(record.extra.get("unlocalised_kind") or "lesion without box")
        return kind, f"findings without a box: {'; '.join(map(str, findings))}"
    return None


def filter_reason(attrs: Mapping, vendor: str | None, filters: Mapping) -> tuple[str, str] | None:
    """(kind, reason) for the first rule the image breaks, or None when it is kept."""
    modalities = _allowed(filters.get("modality"))
    modality = str(attrs.get("modality") or "").upper()
    if modalities and modality not in modalities:
        return "modality", f"modality {modality or 'missing'} is not {'/'.join(sorted(modalities))}"

    intent = str(attrs.get("presentation_intent") or "").upper()
    if filters.get("presentation_only", True) and intent and intent != "FOR PRESENTATION":
        return "presentation intent", f"presentation intent {intent} is not FOR PRESENTATION"

    views = _allowed(filters.get("views"))
    view = attrs.get("view")
    if views and view not in views:
        return "view", f"view {view or 'missing'} is not one of {', '.join(sorted(views))}"
    workup = [m for m in attrs.get("view_modifiers") or []
              if any(word in m.lower() for word in WORKUP_MODIFIERS)]
    if views and workup:
        return "view", f"work-up view ({', '.join(workup)})"

    if filters.get("exclude_implants", True) and attrs.get("implant"):
        return "implant", "breast implant present"
    protocol = attrs.get("special_protocol")
    if filters.get("exclude_special_protocols", True) and protocol:
        named = f" ({protocol})" if isinstance(protocol, str) else ""
        return "special protocol", f"acquired under a special protocol{named}"

    vendors = vendor_for(attrs.get("part", ""), filters.get("vendor"))
    if vendors and vendor not in vendors:
        return "vendor", f"vendor {vendor} is not {'/'.join(sorted(vendors))}"
    return None
