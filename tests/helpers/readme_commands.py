"""The `python -m mame_lightning.…` command lines of README.md, and how the README test stands in for their placeholders.

Commands come from fenced code blocks (continuation lines joined, comments dropped) and from inline
code spans, in document order, so a command added to the README anywhere is picked up. Placeholders
(RUN/…, INPAINT_RUN/…, DIR, OUT, IN, case.dcm, /data/…) are replaced by paths the test provides; a
placeholder nobody provides makes the test fail with its name rather than run something else.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
PREFIX = "python -m mame_lightning."
_CODE = re.compile(r"^```[^\n]*\n(?P<block>.*?)^```|`(?P<inline>[^`\n]+)`", re.MULTILINE | re.DOTALL)
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]+$")


@dataclass(frozen=True)
class Command:
    line: int  # where it is in README.md
    text: str  # as written
    module: str  # mame_lightning.<name>
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"

    def key_set(self) -> set[str]:
        return {arg.split("=", 1)[0].lstrip("+~") for arg in self.args if "=" in arg}


def block_lines(block: str) -> list[str]:
    """The lines of a shell block with backslash continuations joined."""
    joined, current = [], ""
    for raw in block.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        joined.append(current + raw)
        current = ""
    if current:
        joined.append(current)
    return joined


def parse(text: str, line: int) -> Command | None:
    words = shlex.split(text, comments=True)
    if len(words) < 3 or words[:2] != ["python", "-m"] or not re.fullmatch(r"mame_lightning(\.\w+)+", words[2]):
        return None  # not a command (or a pattern such as mame_lightning.<name>)
    return Command(line, text.strip(), words[2], tuple(words[3:]))


def readme_commands(path: Path = README) -> list[Command]:
    text = path.read_text()
    commands = []
    for match in _CODE.finditer(text):
        start_line = text.count("\n", 0, match.start()) + 1
        if match.group("block") is not None:
            for offset, line in enumerate(block_lines(match.group("block")), start=1):
                if line.strip().startswith(PREFIX):
                    command = parse(line, start_line + offset)
                    if command:
                        commands.append(command)
        elif match.group("inline").startswith(PREFIX):
            command = parse(match.group("inline"), start_line)
            if command:
                commands.append(command)
    return commands


def substitute(value: str, places: dict[str, str]) -> str:
    """A README value with its placeholders replaced: whole values, path prefixes and `a|b|c` choices."""
    if value in places:
        return places[value]
    for name, replacement in sorted(places.items(), key=lambda item: -len(item[0])):
        if value.startswith(name + "/"):
            return replacement + value[len(name):]
    if "|" in value and " " not in value:
        return value.split("|")[0]
    return value


PATH_KEYS = {"out", "image", "mask", "ckpt", "config", "ratings", "key", "weights", "text2image", "inpaint"}


def is_path_key(key: str) -> bool:
    """Keys whose values are paths (where an upper-case word is a placeholder, not a view like MLO)."""
    last = key.lstrip("+~").split(".")[-1]
    return last in PATH_KEYS or last.endswith(("_dir", "_path", "_model"))


def substitute_args(command: Command, places: dict[str, str]) -> list[str]:
    """The command's arguments with placeholders filled in; an unknown placeholder is an error."""
    args = []
    for arg in command.args:
        key, sep, value = arg.partition("=")
        if not sep:
            args.append(arg)
            continue
        value = substitute(value, places)
        parts = value.split("/") if ("/" in value or is_path_key(key)) and " " not in value else []
        unknown = [p for p in parts if _PLACEHOLDER.match(p)] + ([value] if value.startswith("/data/") else [])
        if unknown:
            raise AssertionError(f"{command}: no fixture stands in for {unknown[0]!r} (add it to the README test)")
        args.append(f"{key}={value}")
    return args


def fast(command: Command, defaults: list[str]) -> list[str]:
    """Settings that only make a run smaller, for keys the README line does not set itself."""
    given = command.key_set()
    return [d for d in defaults if d.split("=", 1)[0] not in given]


__all__ = ["Command", "README", "readme_commands", "substitute", "substitute_args", "fast", "block_lines"]
