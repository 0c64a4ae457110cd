"""`make demo`'s flow end to end in its quick profile: every stage runs through the real entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage_and_writes_the_summary(tmp_path):
    env = {**os.environ, "MAME_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    # a small raw set keeps the quick flow fast; the stages are the same as the full demo's
    proc = subprocess.run(
        [sys.executable, "-m", "mame_lightning.demo", "--quick", "--root", str(tmp_path / "demo"),
         "--prepare-override", "dataset.source.n=64", "--prepare-override", "dataset.source.height=128",
         "--prepare-override", "dataset.source.width=104"],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert "through stock StableDiffusionPipeline" in summary and "- area agreement:" in summary
    assert "target ≥ 0.9 with every class ≥ 0.8" in summary
    assert "by stock StableDiffusionInpaintPipeline" in summary and "no paste-back" in summary
    assert "the VAE round trip" in summary and "target ≤ 1.5×" in summary and "target ≥ 0.5×" in summary
    assert "| CPU seconds |" in summary and "target ≤ 15 min" in summary
    report = json.loads((tmp_path / "demo" / "inpaint_fidelity" / "inpaint_fidelity.json").read_text())
    assert report["paste_back"] is False and report["pipeline"].startswith("stock StableDiffusionInpaintPipeline")
    assert (tmp_path / "demo" / "inpaint_fidelity" / "inpaint_fidelity_grid.png").is_file()
    assert (tmp_path / "demo" / "text2image" / "export" / "model_index.json").is_file()
    inpaint_index = json.loads((tmp_path / "demo" / "inpaint" / "export" / "unet" / "config.json").read_text())
    assert inpaint_index["in_channels"] == 9  # widened from the text-to-image model
    vae = json.loads((tmp_path / "demo" / "text2image" / "export" / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 0.18215  # measured by the autoencoder stage
    assert "| w=4 |" in (tmp_path / "demo" / "sweep" / "sweep.md").read_text().replace("w=4.0", "w=4")
    csv_rows = (tmp_path / "demo" / "full" / "finding_annotations.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3  # header + n=2 images
    with Image.open(tmp_path / "demo" / "fidelity" / "fidelity_grid.png") as grid:
        assert grid.size[1] > 64
