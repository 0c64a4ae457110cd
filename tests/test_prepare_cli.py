"""The prepare entry point: Hydra CLI, dataset configs, and prepare_from_config for other code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mame_lightning.data.prepare.preparation import prepare_from_config
from helpers.preparation import CONF_DIR, PHI, SIZE, compose_prepare, read_lines, write_bad_inputs, write_dicom

DATASETS = ("vindr", "omi_h", "fusion", "folder", "synthetic")


def run_cli(tmp_path, *overrides):
    env = {**os.environ, "MAME_ROOT": str(tmp_path / "root")}
    return subprocess.run([sys.executable, "-m", "mame_lightning.prepare", *overrides],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)


def test_cli_prepares_a_dicom_folder_with_the_two_public_keys(tmp_path):
    raw, out = tmp_path / "IN", tmp_path / "OUT"
    write_dicom(raw / "a" / "left.dcm", laterality="L", seed=1)
    write_dicom(raw / "b" / "IMG_2", view="MLO", laterality="R", seed=2)
    write_dicom(raw / "b" / "xccl.dcm", view="XCCL", seed=3)
    bad = write_bad_inputs(raw)
    proc = run_cli(tmp_path, "dataset=folder", f"dataset.raw_dir={raw}", f"dataset.prepared_dir={out}",
                   f"dataset.size={SIZE}", "preparation.num_workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 kept" in proc.stdout and str(out) in proc.stdout
    assert f"rejected {len(bad)}" in proc.stdout and "filtered 1 (view 1)" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 2 and {e["file"] for e in report["rejected"]} == set(bad)
    assert {line["source"] for line in read_lines(out, "text2image")} == {"a/left.dcm", "b/IMG_2"}
    logs = [p.read_text() for p in (tmp_path / "root" / "outputs" / "prepare").rglob("*.log")]
    assert logs and any("kept" in text for text in logs)  # Hydra's run folder got the log
    outputs = "".join(p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file())
    for value in PHI.values():
        assert value not in proc.stdout + proc.stderr + "".join(logs) + outputs


def test_cli_names_a_missing_annotation_file(tmp_path):
    raw = tmp_path / "vindr"
    raw.mkdir()
    proc = run_cli(tmp_path, "dataset=vindr", f"dataset.raw_dir={raw}", f"dataset.prepared_dir={tmp_path / 'o'}")
    assert proc.returncode != 0
    assert "breast-level_annotations.csv" in proc.stderr and "not found" in proc.stderr


@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_config_composes_with_the_shared_keys(tmp_path, name):
    cfg = compose_prepare(name, tmp_path / "raw", tmp_path / "out")
    dataset = cfg.dataset
    assert dataset.name == name and dataset.source._target_.startswith("mame_lightning.data.prepare.sources")
    assert set(dataset.templates) == {"text2image", "inpaint"}
    assert dataset.templates.inpaint == "a mammogram with a lesion"
    assert cfg.preparation.size == SIZE  # the dataset's size drives the preparation
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml"))
    assert defaults["raw_dir"] == f"${{paths.data_dir}}/{name}/raw"
    assert defaults["prepared_dir"].startswith(f"${{paths.data_dir}}/{name}/prepared")


def test_paper_templates_and_vendors():
    templates = {name: OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml").templates.text2image
                 for name in DATASETS}
    assert templates["omi_h"] == "a mammogram in {view} view with {area} area"
    assert templates["vindr"] == "a mammogram in {view} view with {density} density"
    assert templates["fusion"] == "a {vendor} mammogram in {view} view with {density} density and {area} area"
    assert templates["synthetic"] == "a mammogram in {view} view with {area} area"
    vendors = {name: OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml").filters.vendor for name in DATASETS}
    assert vendors["vindr"] == "siemens" and vendors["omi_h"] == "hologic" and vendors["synthetic"] is None


def test_synthetic_prepared_dir_names_its_size(monkeypatch, tmp_path):
    monkeypatch.setenv("MAME_ROOT", str(tmp_path))
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("prepare", overrides=["dataset=synthetic"])
    assert cfg.dataset.prepared_dir == f"{tmp_path}/data/synthetic/prepared_64"
    assert cfg.preparation.size == 64 and cfg.preparation.num_workers == 2


def test_prepare_from_config_without_a_preparation_block(tmp_path, capsys):
    """Training configs carry a dataset but no preparation settings: the shipped ones apply."""
    raw = tmp_path / "raw"
    write_dicom(raw / "x.dcm", seed=4)
    full = compose_prepare("folder", raw, tmp_path / "out")
    training_like = OmegaConf.create({"paths": OmegaConf.to_container(full.paths),
                                      "dataset": OmegaConf.to_container(full.dataset), "seed": 0})
    training_like.dataset.source.id_salt = "s"
    report = prepare_from_config(training_like, echo=True)
    assert report["kept"] == 1 and report["config"]["size"] == SIZE
    assert report["run"]["num_workers"] == 2 and report["config"]["area_thresholds"] == [0.4, 0.6]
    assert "1 kept" in capsys.readouterr().out
    assert "preparation" not in training_like  # the caller's config is left as it was


def test_cli_synthetic_default_flow_is_small_when_asked(tmp_path):
    proc = run_cli(tmp_path, "dataset=synthetic", "dataset.source.n=8", "dataset.source.height=96",
                   "dataset.source.width=80", "dataset.size=32", "dataset.source.progress=false",
                   "preparation.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "root" / "data" / "synthetic" / "prepared_32"
    assert (tmp_path / "root" / "data" / "synthetic" / "raw" / "vindr" / "finding_annotations.csv").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["in"] == 8 and report["kept"] >= 4
    assert Path(report["run"]["prepared_dir"]) == out.resolve()
