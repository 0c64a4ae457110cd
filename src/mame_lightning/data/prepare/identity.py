"""Patient identity in file paths: PACS exports often name folders after the patient.

Preparation writes each image's path relative to raw_dir (metadata ``source``, sidecars, report
entries) because that is how users find their files. When any component of that path contains the
file's own patient identity (a PatientName part of 3+ letters, PatientID, OtherPatientIDs,
AccessionNumber or the birth date), the path is shown as a salted hash instead, everywhere.
The identity is read from the file's own header, leniently, so a file whose pixels cannot be
decoded is still checked.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import PurePosixPath

import pydicom

HIDDEN_DIR = "hidden"
MIN_LENGTH = 3  # shorter identifiers (and name parts) would match almost any path
IDENTITY_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate")
_NAME_SEPARATORS = re.compile(r"[\^=,\s]+")
_NOT_DIGIT = re.compile(r"\D+")


def _values(element_value) -> list[str]:
    if element_value is None:
        return []
    if isinstance(element_value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v) for v in element_value]
    if isinstance(element_value, bytes):
        return [element_value.decode("latin-1", errors="replace")]
    return [str(element_value)]


def identity_strings(ds) -> tuple[set[str], set[str]]:
    """(texts, dates): lower-case name parts and identifiers, and the birth date as digit strings
    in the orders people write dates (YYYYMMDD, DDMMYYYY, MMDDYYYY)."""
    texts, dates = set(), set()
    for keyword in IDENTITY_KEYWORDS:
        try:
            values = _values(ds.get(keyword))
        except Exception:  # noqa: BLE001 - a malformed element reads as absent
            continue
        for value in values:
            value = value.strip()
            if keyword == "PatientName":
                texts |= {part.lower() for part in _NAME_SEPARATORS.split(value)
                          if sum(ch.isalpha() for ch in part) >= MIN_LENGTH}
            elif keyword == "PatientBirthDate":
                digits = _NOT_DIGIT.sub("", value)
                if len(digits) == 8:
                    year, month, day = digits[:4], digits[4:6], digits[6:]
                    dates |= {digits, day + month + year, month + day + year}
            elif len(value) >= MIN_LENGTH:
                texts.add(value.lower())
    return texts, dates


def read_identity(path) -> tuple[set[str], set[str]]:
    """The identity strings of a DICOM file's header; empty when it cannot be read at all."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=list(IDENTITY_KEYWORDS))
    except Exception:  # noqa: BLE001 - an unreadable file reveals nothing to match
        return set(), set()
    return identity_strings(ds)


def reveals_identity(relative_path: str, identity: tuple[set[str], set[str]]) -> bool:
    """True when a component of the path contains one of the identity strings (case-insensitively;
    birth dates also with their separators removed)."""
    texts, dates = identity
    for component in PurePosixPath(relative_path).parts:
        lowered = component.lower()
        if any(text in lowered for text in texts):
            return True
        digits = _NOT_DIGIT.sub("", component)
        if any(date in lowered or date in digits for date in dates):
            return True
    return False


def hidden_path(relative_path: str, salt: str) -> str:
    """``hidden/<salted hash>`` (keeping a short extension): stable for a path and salt, and not
    reversible without the salt."""
    digest = hashlib.sha256(f"{salt}\0{relative_path}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
    suffix = PurePosixPath(relative_path).suffix
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix) else ""
    return f"{HIDDEN_DIR}/{digest}{suffix}"


def redact(text: str, identity: tuple[set[str], set[str]]) -> str:
    """``text`` with every identity string replaced by <redacted> (for reasons echoing a header)."""
    for value in sorted(identity[0] | identity[1], key=len, reverse=True):
        text = re.sub(re.escape(value), "<redacted>", text, flags=re.IGNORECASE)
    return text


def replace_strings(obj, replacements: Iterable[tuple[str, str]]):
    """A copy of a JSON-like object with each ``old`` substring of every string replaced by ``new``."""
    replacements = [(old, new) for old, new in replacements if old]
    if isinstance(obj, str):
        for old, new in replacements:
            obj = obj.replace(old, new)
        return obj
    if isinstance(obj, dict):
        return {key: replace_strings(value, replacements) for key, value in obj.items()}
    if isinstance(obj, list):
        return [replace_strings(value, replacements) for value in obj]
    return obj


__all__ = ["HIDDEN_DIR", "hidden_path", "identity_strings", "read_identity", "redact", "replace_strings",
           "reveals_identity"]
