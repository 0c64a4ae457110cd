"""Entry points refuse bad settings and missing data in one line, early: before a model is built or loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from helpers.preparation import CONF_DIR, compose_prepare, write_dicom


def cli(tmp_path, module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAME_ROOT": str(tmp_path / "root"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"mame_lightning.{module}", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)


def test_prepare_names_a_missing_raw_dir_in_one_line(tmp_path):
    proc = cli(tmp_path, "prepare", "dataset=folder", f"dataset.raw_dir={tmp_path / 'nowhere'}",
               f"dataset.prepared_dir={tmp_path / 'out'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'}: DICOM folder not found"


def test_train_names_a_missing_prepared_dir_without_a_traceback(tmp_path):
    proc = cli(tmp_path, "train", "dataset=folder", f"dataset.prepared_dir={tmp_path / 'nowhere'}",
               "trainer.accelerator=cpu", "precision=32-true",
               f"hydra.run.dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: Prepared set not found: {tmp_path / 'nowhere'}" in proc.stderr


def test_missing_images_are_found_before_the_model_is_built(tmp_path, monkeypatch):
    from mame_lightning.data.prepare.preparation import prepare_dataset
    from mame_lightning.runs import training

    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    for i in range(3):
        write_dicom(raw / f"{i}.dcm", seed=i)
    prepare_dataset(compose_prepare("folder", raw, prepared))
    lost = sorted((prepared / "text2image" / "images").glob("*.png"))[1]
    lost.unlink()

    def no_model(cfg):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(training, "build_components", no_model)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"run_dir={tmp_path / 'run'}", f"paths.root={tmp_path}", "dataset=folder",
                                          f"dataset.prepared_dir={prepared}", "trainer.accelerator=cpu",
                                          "precision=32-true"])
    with pytest.raises(FileNotFoundError, match=rf"1 listed file\(s\) missing .*{lost.name}"):
        training.train(cfg)


@pytest.mark.parametrize("args, message", [
    (["steps=0"], "steps=0: use a whole number from 1 to 1000"),
    (["guidance=-1"], "guidance=-1: use a number from 0 to 100; 0 and 1 sample without classifier-free guidance"),
    (["n=0"], "n=0: use a whole number from 1"),
    (["seed=-5"], "seed=-5: use a whole number from 0"),
    (["strength=0"], "strength=0: use a number from 0.01 to 1"),
    (["accelerate=fast"], "accelerate='fast': choose from none, deepcache"),
    (["accelerate=deepcache", "deepcache.interval=0"], "deepcache.interval=0: use a whole number from 1"),
])
def test_generate_refuses_impossible_settings_before_loading_a_model(tmp_path, monkeypatch, args, message):
    from mame_lightning import generate

    monkeypatch.setattr(sys, "argv", ["generate", f"model_path={tmp_path / 'no_model'}", f"out={tmp_path / 'o'}",
                                      *args])
    with pytest.raises(SystemExit) as err:
        generate.cli()
    assert str(err.value.code).startswith(f"error: {message}")


def test_generate_refuses_an_existing_file_as_out(tmp_path, monkeypatch):
    from mame_lightning import generate

    taken = tmp_path / "results.png"
    taken.write_bytes(b"mine")
    monkeypatch.setattr(sys, "argv", ["generate", f"model_path={tmp_path / 'no_model'}", f"out={taken}"])
    with pytest.raises(SystemExit, match="is an existing file"):
        generate.cli()
    assert taken.read_bytes() == b"mine"


def test_precision_32_selects_full_precision_as_the_readme_says(tmp_path):
    from mame_lightning.runs.command_line import quote_numeric_choices

    assert quote_numeric_choices(["train", "precision=32", "trainer.max_steps=32", "precision=32,bf16-mixed"]) == [
        "train", "precision='32'", "trainer.max_steps=32", "precision='32',bf16-mixed"]
    proc = cli(tmp_path, "train", "precision=32", "--cfg", "job", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lightning: 32-true" in proc.stdout
