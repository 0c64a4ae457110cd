"""Checkpoints and run configs from elsewhere cannot run code: weights_only loads, an allow-list of builders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import mame_lightning
from helpers.modules import adamw, loader, tiny, toy_items, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CONF_DIR = str(Path(mame_lightning.__file__).parent / "conf")


class Payload:
    """Unpickling this runs a shell command (what a crafted .ckpt does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": {"x": Payload(marker)}}, path)
    return path


def run_folder(root: Path, overrides: list[str] = ()) -> Path:
    """A run folder with the resolved config of a tiny text-to-image run, as training writes it."""
    from mame_lightning.runs.training import save_resolved_config

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root={root}", f"run_dir={root / 'run'}", *overrides])
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_resolved_config(cfg, run / "resolved_config.yaml")
    return run


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    from mame_lightning.models.checkpoints import CheckpointError, check_checkpoint, load_checkpoint

    marker = tmp_path / "pwned"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refusing .*posix\.system|evil\.ckpt: refusing"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="refusing"):
        check_checkpoint(ckpt)
    assert not marker.exists()


def test_export_and_generate_from_a_crafted_checkpoint_run_nothing(tmp_path, monkeypatch):
    from mame_lightning import generate
    from mame_lightning.models.export import export_checkpoint

    run = run_folder(tmp_path)
    marker = tmp_path / "pwned"
    ckpt = crafted_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(Exception) as err:
        export_checkpoint(ckpt)
    assert not marker.exists(), "the checkpoint ran a command"
    assert "last.ckpt: refusing to load this checkpoint" in str(err.value)
    monkeypatch.setattr(sys, "argv", ["generate", f"model_path={ckpt}", f"out={tmp_path / 'out'}", "device=cpu"])
    with pytest.raises(SystemExit) as err:
        generate.cli()
    assert "refusing to load this checkpoint" in str(err.value.code)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_run_config_that_builds_other_callables_is_refused(tmp_path):
    from mame_lightning.models.export import export_checkpoint

    run = run_folder(tmp_path)
    secret, marker = tmp_path / "id_rsa", tmp_path / "copied"
    secret.write_text("private")
    cfg = OmegaConf.load(run / "resolved_config.yaml")  # shutil.copy passes Hydra's own blocklist
    cfg.model = {"_target_": "shutil.copy", "_args_": [str(secret), str(marker)]}
    OmegaConf.save(cfg, run / "resolved_config.yaml")
    torch.save({"state_dict": {}, "global_step": 0}, run / "checkpoints" / "last.ckpt")
    with pytest.raises(Exception) as err:
        export_checkpoint(run / "checkpoints" / "last.ckpt")
    assert not marker.exists(), "the run config ran a command"
    assert "model._target_=shutil.copy" in str(err.value)


def test_checkpoints_with_omegaconf_hyperparameters_still_load(tmp_path):
    """Runs that passed ema={decay: ...} stored an OmegaConf node in hyper_parameters."""
    from mame_lightning.models.checkpoints import load_checkpoint

    state = {"state_dict": {"w": torch.ones(2)}, "global_step": 3,
             "hyper_parameters": {"ema": OmegaConf.create({"decay": 0.9}), "names": OmegaConf.create(["a"])}}
    torch.save(state, tmp_path / "old.ckpt")
    loaded = load_checkpoint(tmp_path / "old.ckpt")
    assert float(loaded["hyper_parameters"]["ema"]["decay"]) == 0.9
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_a_corrupt_last_checkpoint_under_resume_auto_names_the_file_and_the_way_out(tmp_path):
    from mame_lightning.runs.training import resolve_ckpt_path

    run = run_folder(tmp_path, ["resume=auto"])
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, last)
    last.write_bytes(last.read_bytes()[:300])  # killed mid-copy
    cfg = OmegaConf.create({"resume": "auto", "ckpt_path": None, "trainer": {"default_root_dir": str(run)}})
    with pytest.raises(Exception) as err:
        resolve_ckpt_path(cfg)
    message = str(err.value)
    assert str(last) in message and "ckpt_path=" in message and "remove" in message
    assert "\n" not in message


def test_new_checkpoints_need_no_allow_list(model_cache, tmp_path):
    """A run configured with ema={decay: ...} (an OmegaConf node) writes plain types only."""
    from mame_lightning.models.text2image import Text2ImageModule

    module = Text2ImageModule(tiny(model_cache), adamw(), ema=OmegaConf.create({"decay": 0.9}))
    fit = trainer(max_steps=1, enable_checkpointing=False)
    fit.fit(module, loader(toy_items(module.components)))
    fit.save_checkpoint(tmp_path / "new.ckpt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "new.ckpt") == []
    assert "ema" in torch.load(tmp_path / "new.ckpt", weights_only=True)
