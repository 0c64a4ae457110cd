"""Models: Stable Diffusion parts, the diffusion training arithmetic, and the LightningModules.

Names are loaded on first use so that `import mame_lightning.models` stays cheap.
"""

from importlib import import_module

_EXPORTS = {
    "SDComponents": "components",
    "ModelLoadError": "components",
    "load_components": "components",
    "tiny_components": "components",
    "build_tiny": "components",
    "build_sd15_arch": "components",
    "sd15_arch_components": "components",
    "widen_conv_in": "components",
    "build_tokenizer": "tokenizer",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
