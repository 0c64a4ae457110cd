"""What the entry points share: command-line values Hydra would misread, and one-line errors.

A user's mistake (a missing file, a bad value) ends the command with `error: <what and where>` and
exit status 1, never a traceback; inside a multirun the error is raised instead, so Hydra records the
job as failed and the sweep goes on to its summary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mame_lightning import CONF_DIR

_PLAIN_CHOICES = re.compile(r"^[\w.-]+(,[\w.-]+)*$")


def quote_numeric_choices(argv: list[str], conf_dir: str = CONF_DIR) -> list[str]:
    """`precision=32` -> `precision='32'`: Hydra reads a bare number as an int, and a group option is a name.

    Only for groups of conf/ that have an option file of that name; sweeps (`precision=32,bf16-mixed`) too.
    """
    fixed = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        group = Path(conf_dir) / key
        if sep and group.is_dir() and _PLAIN_CHOICES.match(value):
            choices = value.split(",")
            if any((group / f"{c}.yaml").is_file() and re.fullmatch(r"[\d.]+", c) for c in choices):
                arg = key + "=" + ",".join(f"'{c}'" if re.fullmatch(r"[\d.]+", c) else c for c in choices)
        fixed.append(arg)
    return fixed


def protect_overrides(argv: list[str], list_keys: Sequence[str], text_keys: Sequence[str]) -> list[str]:
    """`box=1,2,3,4` -> `box=[1,2,3,4]` for `list_keys`; free text and paths (`text_keys`) quoted, so they
    reach the config verbatim (a comma makes a sweep, brackets a list, a colon a dict, and folder names
    from PACS exports hold characters such as ^ that Hydra's grammar rejects)."""
    fixed = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+")
        if sep and value and value[0] not in "'\"[":
            if name in list_keys and "," in value:
                arg = f"{key}=[{value}]"
            elif name in text_keys:
                arg = key + "='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        fixed.append(arg)
    return fixed


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def one_line_errors(errors: tuple[type[BaseException], ...], *, raise_in_multirun: bool = False) -> Iterator[None]:
    """`errors` end the command with one line naming the problem (exit status 1)."""
    try:
        yield
    except errors as exc:
        if raise_in_multirun and in_multirun():
            raise
        raise SystemExit(f"error: {exc}") from None


__all__ = ["in_multirun", "one_line_errors", "protect_overrides", "quote_numeric_choices"]
