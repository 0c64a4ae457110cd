"""What `python -m mame_lightning.synth out=DIR n=N [preset=demo]` does: write the synthetic raw set
(`data.synthetic_set.write_synthetic_set`) at the preset's size and print a table of what it holds.

The set stands in for restricted mammography data: phantoms in the VinDr-Mammo and OMI-DB
layouts, read back through the same source adapters real data goes through.
"""

from __future__ import annotations

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mame_lightning.data.synthetic.phantom_set import write_synthetic_set


def image_size(cfg: DictConfig) -> tuple[int, int]:
    """(height, width): both given explicitly, or else the preset's."""
    if cfg.height is not None and cfg.width is not None:
        return int(cfg.height), int(cfg.width)
    if cfg.height is not None or cfg.width is not None:
        raise ValueError("give both height and width, or neither (then the preset decides)")
    if cfg.preset not in cfg.presets:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose from {sorted(cfg.presets)}")
    height, width = cfg.presets[cfg.preset]
    return int(height), int(width)


def summary_table(summary: dict) -> Table:
    """One row per attribute, its values with their counts."""
    table = Table(title=f"synthetic set: {summary['n']} images in {summary['out_dir']}")
    table.add_column("attribute")
    table.add_column("counts")
    for name, counts in summary["counts"].items():
        table.add_row(name, ", ".join(f"{value}: {count}" for value, count in counts.items()))
    return table


def run(cfg: DictConfig) -> dict:
    height, width = image_size(cfg)
    summary = write_synthetic_set(cfg.out, n=int(cfg.n), height=height, width=width,
                                  seed=int(cfg.seed), lesion_fraction=float(cfg.lesion_fraction),
                                  calcifications=bool(cfg.calcifications),
                                  progress=bool(cfg.progress))
    console = Console()
    console.print(summary_table(summary))
    console.print(f"{summary['written']} written, {summary['reused']} unchanged, "
                  f"{summary['removed']} stale removed; {len(summary['phi_strings'])} fake "
                  f"identifiers inside the DICOMs; manifest: {summary['manifest']}")
    return summary
