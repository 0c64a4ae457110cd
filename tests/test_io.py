"""Durable writes: content and permissions as a plain write, fsync before the rename, nothing left on failure,
folder swaps that keep the old folder until the new one is complete; and no other module renames temporaries."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mame_lightning
from mame_lightning import io as durable

PACKAGE = Path(mame_lightning.__file__).parent


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(durable.TEMP_SUFFIX))


def plain_mode(tmp_path: Path) -> int:
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    return probe.stat().st_mode & 0o777


def test_writers_give_the_content_and_the_mode_of_a_plain_write(tmp_path):
    durable.write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    durable.write_text(tmp_path / "t.txt", "ä\r\n")
    durable.write_json(tmp_path / "r.json", {"x": np.float32(0.5), "p": tmp_path, "a": np.arange(2)})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_bytes() == "ä\r\n".encode()  # no newline translation
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 0.5, "p": str(tmp_path), "a": [0, 1]}
    assert (tmp_path / "r.json").read_text().endswith("}\n")
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == plain_mode(tmp_path)
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "a") == []


def test_png_keeps_pixels_and_utf8_text_and_equal_input_gives_equal_bytes(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    durable.write_png(tmp_path / "g.png", grey, text={"prompt": "dense → small", "synthetic": "true"})
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "L" and np.array_equal(np.asarray(image), grey)
        assert image.text == {"prompt": "dense → small", "synthetic": "true"}
    rgb = Image.fromarray(np.dstack([grey] * 3))
    durable.write_png(tmp_path / "c.png", rgb)
    assert durable.png_bytes(rgb) == (tmp_path / "c.png").read_bytes()


def test_the_file_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    durable.write_text(tmp_path / "x", "1")
    with durable.atomic_path(tmp_path / "y") as tmp:
        tmp.write_text("2")
    assert events == ["fsync", "replace", "fsync", "replace"]
    events.clear()
    durable.write_text(tmp_path / "z", "3", fsync=False)
    assert events == ["replace"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    target.write_text("old")

    def refuse(*args):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", refuse)
        with pytest.raises(OSError, match="disk full"):
            durable.write_json(target, {"new": 1})
    with pytest.raises(RuntimeError):
        with durable.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_append_line_adds_one_line_and_keeps_the_old_ones(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}')  # no final newline
    durable.append_line(path, '{"b": 2}')
    durable.append_line(path, '{"c": 3}\n')
    assert path.read_text().splitlines() == ['{"a": 1}', '{"b": 2}', '{"c": 3}']


def test_atomic_folder_replaces_the_old_folder_only_when_complete(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with durable.atomic_folder(target) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("export failed half way")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with durable.atomic_folder(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".export.")
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging or old folder left


def test_keep_existing_keeps_a_folder_another_process_finished_first(tmp_path):
    target = tmp_path / "model"
    with durable.atomic_folder(target, keep_existing=True) as staging:
        (staging / "mine").write_text("mine")
        target.mkdir()
        (target / "theirs").write_text("theirs")  # built meanwhile by another process
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target, new = tmp_path / "set", tmp_path / ".set.new.tmp"
    target.mkdir()
    (target / "old").write_text("old")
    new.mkdir()
    real_replace, calls = os.replace, []

    def second_fails(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError("interrupted")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="interrupted"):
        durable.replace_folder(new, target)
    assert (target / "old").read_text() == "old"


def _renames(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            name = node.func.attr
            if (owner, name) in {("os", "replace"), ("os", "rename"), ("shutil", "move"), ("tempfile", "mkstemp")}:
                found.append((node.lineno, f"{owner}.{name}"))
            elif name == "rename":
                found.append((node.lineno, f".{name}"))
    return found


def test_no_other_module_renames_a_temporary_into_place():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "io.py":
            continue
        for line, call in _renames(ast.parse(path.read_text(encoding="utf-8"))):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line} {call}")
    assert offenders == [], "write through mame_lightning.io instead: " + ", ".join(offenders)
