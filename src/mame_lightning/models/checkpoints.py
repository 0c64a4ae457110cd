"""Read training checkpoints without running code from them.

A `.ckpt` is a pickle: loaded with `weights_only=False` it can call any function, so a file from
elsewhere could run a shell command the moment it is opened. Every checkpoint here is read with
`torch.load(weights_only=True)`, which builds tensors and plain containers only, plus the few
classes our own checkpoints hold (OmegaConf containers in the hyper-parameters of runs that passed
a mapping such as `ema={decay: ...}`). Anything else is refused with a message naming the file
and the type it asked for.
"""

from __future__ import annotations

import collections
import contextlib
import pickle
import typing
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or at all; the message names the file."""


def _omegaconf_types() -> list:
    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    value_nodes = [nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode,
                   nodes.EnumNode, nodes.PathNode, nodes.BytesNode]
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, *value_nodes]


def safe_globals() -> list:
    """The types (besides tensors and plain containers) a checkpoint of ours may contain."""
    builtin = [dict, list, tuple, set, int, float, str, bool]
    return [*builtin, typing.Any, collections.defaultdict, collections.OrderedDict, *_omegaconf_types()]


@contextlib.contextmanager
def allowed_types():
    """`torch.load(weights_only=True)` inside this block also accepts `safe_globals()` (torch >= 2.5)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    with allow(safe_globals()) if allow else contextlib.nullcontext():
        yield


def _names(types) -> set[str]:
    return {f"{t.__module__}.{getattr(t, '__qualname__', getattr(t, '_name', str(t)))}" for t in types}


def _refusal(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to load this checkpoint: it needs {detail}, which could run code when opened "
        "(checkpoints are read with torch.load(weights_only=True)). Re-save it from a trusted source "
        "with plain tensors and containers"
    )


def check_checkpoint(path: str | Path) -> Path:
    """Cheap check before a long load: the file is a readable checkpoint that needs only allowed types.

    Reads the pickle part only (not the tensors), so it costs little even for a multi-GB file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if lister is None:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: not a readable checkpoint (not a torch zip file); the file is damaged")
        return path
    try:
        unsafe = set(lister(path))
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                              "the file is damaged or incomplete") from exc
    needed = sorted(unsafe - _names(safe_globals()))
    if needed:
        raise _refusal(path, ", ".join(needed))
    return path


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict on the CPU, read with weights_only=True and our allow-list."""
    path = check_checkpoint(path)
    try:
        with allowed_types():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, str(exc).split("\n")[-1][:300] or "a type outside the allow-list") from exc
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint (no state_dict); pass a Lightning .ckpt")
    return state


__all__ = ["CheckpointError", "allowed_types", "check_checkpoint", "load_checkpoint", "safe_globals"]
