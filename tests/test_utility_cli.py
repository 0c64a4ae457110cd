"""`python -m mame_lightning.utility`: the README command end to end, and bad input refused before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mame_lightning.eval.report import read_csv
from mame_lightning.utility.__main__ import main
from helpers.utility import FAST

pytestmark = pytest.mark.usefixtures("one_thread")

ARMS = ["real", "real+synthetic", "synthetic"]


def run_in_process(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["utility", *args])
    main()


def error_of(monkeypatch, *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        run_in_process(monkeypatch, *args)
    message = str(exited.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def _png_with_content(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and float(np.asarray(image.convert("L")).std()) > 1.0


@pytest.mark.slow
def test_readme_command_writes_the_report_for_three_arms_and_two_seeds(utility_prepared, t2i_dir, inpaint_dir,  # noqa: F811
                                                                       tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mame_lightning.utility", f"prepared_dir={utility_prepared}",
               f"text2image_model={t2i_dir}", f"inpaint_model={inpaint_dir}", "n_synthetic=4", "seeds=[0,1]",
               f"out={out}", *FAST]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "utility.json").read_text())

    split = result["split"]
    assert set(split) == {"train", "val", "test"}
    assert split["test"]["lesion"] >= 1 and split["test"]["healthy"] >= 1
    synthesis = result["synthesis"]
    assert synthesis["n"] == 4 and sum(p["n"] for p in synthesis["parts"]) == 4 and not synthesis["reused"]
    findings = [row for p in synthesis["parts"] for row in read_csv(out / "synthetic" / p["folder"] /
                                                                      "finding_annotations.csv")]
    assert [(r["xmin"], r["ymin"], r["xmax"], r["ymax"]) for r in findings] == [("24", "24", "32", "32")] * 4

    assert list(result["arms"]) == ARMS
    expected_train = {"real": (split["train"]["images"], 0), "real+synthetic": (split["train"]["images"], 8),
                      "synthetic": (0, 8)}
    for name, arm in result["arms"].items():
        assert (arm["train_real"], arm["train_synthetic"]) == expected_train[name]
        assert arm["steps"] == 3 and [r["seed"] for r in arm["runs"]] == [0, 1]
        for run in arm["runs"]:
            assert run["steps"] == 3 and 0.0 <= run["auroc"] <= 1.0
            assert len(run["probabilities"]) == split["test"]["images"]  # scored on the real test split only
            assert run["roc"]["fpr"][0] == 0.0 and run["roc"]["tpr"][-1] == 1.0
            assert 0.0 <= run["sensitivity_at_specificity"] <= 1.0 and 0.0 <= run["localisation"] <= 1.0
        assert arm["summary"]["auroc"]["mean"] == pytest.approx(np.mean([r["auroc"] for r in arm["runs"]]))
        low, high = arm["auroc_ci"]
        assert 0.0 <= low <= high <= 1.0
        assert _png_with_content(Path(arm["roc_plot"]))
        assert ("on_synthetic" in arm) == (name == "real")  # synthetic images are test data only for that arm
    assert 0.0 < result["localisation_chance"] < 1.0
    assert _png_with_content(out / "gradcam_real_vs_synthetic.png")
    assert [s["stage"] for s in result["stages"]][-1] == "report"
    assert sum(s["stage"].startswith("train and score") for s in result["stages"]) == 6
    assert all("load_start" in s and s["seconds"] >= 0 for s in result["stages"])

    markdown = (out / "utility.md").read_text()
    for name in ARMS:
        assert f"\n| {name} | " in markdown
    assert "| test AUROC | 95 % CI |" in markdown and "| stage | seconds |" in markdown
    assert "The real-only classifier on the synthetic pairs" in markdown
    assert markdown.splitlines()[0] in proc.stdout


def test_a_model_folder_of_the_wrong_task_is_named(monkeypatch, t2i_dir, inpaint_dir, tmp_path):  # noqa: F811
    message = error_of(monkeypatch, f"text2image_model={inpaint_dir}", f"inpaint_model={inpaint_dir}",
                       f"out={tmp_path}")
    assert f"text2image_model={inpaint_dir} holds a model of task 'inpaint'" in message
    message = error_of(monkeypatch, f"text2image_model={t2i_dir}", f"inpaint_model={t2i_dir}", f"out={tmp_path}")
    assert f"inpaint_model={t2i_dir} holds a model of task 'text2image', but inpaint_model needs task 'inpaint'" in message
    message = error_of(monkeypatch, f"text2image_model={tmp_path / 'nothing'}", f"out={tmp_path}")
    assert "does not exist" in message and "make demo" in message
    assert not list(tmp_path.iterdir())


def test_too_few_studies_stop_before_any_generation(monkeypatch, utility_prepared, t2i_dir, inpaint_dir,  # noqa: F811
                                                    tmp_path):
    import shutil

    few = tmp_path / "few"
    shutil.copytree(utility_prepared, few)
    for task in ("text2image", "inpaint"):
        lines = (few / task / "metadata.jsonl").read_text().splitlines()
        (few / task / "metadata.jsonl").write_text("\n".join(lines[:2]) + "\n")
    out = tmp_path / "out"
    message = error_of(monkeypatch, f"prepared_dir={few}", f"text2image_model={t2i_dir}",
                       f"inpaint_model={inpaint_dir}", f"out={out}")
    assert f"prepared_dir={few}:" in message and "too few" in message and "split.fractions" in message
    assert not (out / "synthetic").exists() and not (out / "runs").exists()
    message = error_of(monkeypatch, f"prepared_dir={tmp_path / 'none'}", f"text2image_model={t2i_dir}",
                       f"inpaint_model={inpaint_dir}", f"out={out}")
    assert "holds no prepared set" in message and "mame_lightning.prepare" in message


def test_too_many_synthetic_images_for_the_budget_stop_before_training(monkeypatch, utility_prepared, t2i_dir,  # noqa: F811
                                                                        inpaint_dir, tmp_path):
    out = tmp_path / "out"
    message = error_of(monkeypatch, f"prepared_dir={utility_prepared}", f"text2image_model={t2i_dir}",
                       f"inpaint_model={inpaint_dir}", f"out={out}", "n_synthetic=5000", "synthesis.budget_s=60",
                       *FAST)
    assert "n_synthetic=5000 needs about" in message and "synthesis.budget_s=60" in message
    assert "lower n_synthetic to" in message
    assert not (out / "runs").exists() and not (out / "synthetic" / "synthesis.json").exists()


def test_unknown_arm_and_empty_seeds_are_refused(monkeypatch, tmp_path):
    assert "arms=['real', 'both']: choose from real, real+synthetic, synthetic" in error_of(
        monkeypatch, "arms=[real,both]", f"out={tmp_path}")
    assert "seeds=[]" in error_of(monkeypatch, "seeds=[]", f"out={tmp_path}")
