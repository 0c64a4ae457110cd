"""Plain records that every metadata source produces and every later stage consumes.

They hold no pixels and no patient identifiers, so they can be written to JSON reports freely.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Box:
    """An axis-aligned box in pixel coordinates: x to the right, y down, x1/y1 exclusive."""

    x0: float
    y0: float
    x1: float
    y1: float
    category: str = "lesion"

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def to_list(self) -> list:
        """`[x0, y0, x1, y1, category]`, the form used in metadata.jsonl."""
        return [self.x0, self.y0, self.x1, self.y1, self.category]

    @classmethod
    def from_list(cls, values: list | tuple) -> "Box":
        """Inverse of `to_list`; a 4-element list gets the default category."""
        if len(values) not in (4, 5):
            raise ValueError(f"a box needs 4 or 5 values, got {len(values)}: {values!r}")
        x0, y0, x1, y1 = (float(v) for v in values[:4])
        category = str(values[4]) if len(values) == 5 else "lesion"
        return cls(x0, y0, x1, y1, category)


@dataclass
class ImageRecord:
    """One source image as a metadata source describes it (paths relative to the raw folder)."""

    source: str
    image_id: str
    view: str | None = None
    laterality: str | None = None
    manufacturer: str | None = None
    density: str | None = None
    boxes: list[Box] = field(default_factory=list)
    implant: bool | None = None
    special_protocol: bool | None = None
    split: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; boxes become dicts with their field names."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageRecord":
        """Inverse of `to_dict`; boxes may be dicts or `[x0, y0, x1, y1(, category)]` lists."""
        values = dict(data)
        values["boxes"] = [_box_from_any(b) for b in values.get("boxes") or []]
        values["extra"] = dict(values.get("extra") or {})
        return cls(**values)


@dataclass
class Rejection:
    """A listing or annotation entry a source could not turn into a record (a broken client JSON,
    a malformed annotation row): it ends in the report's ``rejected`` list and the run goes on.

    ``file`` is relative to the raw folder; ``image_id`` is set when the entry belongs to one image.
    """

    file: str
    kind: str
    reason: str
    image_id: str = ""

    def outcome(self) -> dict[str, Any]:
        """The item outcome preparation records for it (no files written)."""
        return {"id": self.image_id, "file": self.file, "status": "rejected", "task": None,
                "kind": self.kind, "reason": self.reason}


def _box_from_any(value: Box | dict | list | tuple) -> Box:
    if isinstance(value, Box):
        return value
    if isinstance(value, dict):
        return Box(**value)
    return Box.from_list(value)
