"""Cluster configs as Lightning, Hydra, submitit and Optuna read them, the sweep records and summary,
resume after a requeue, and an Optuna search run through the local parallel launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers.cluster import TINY, check_optuna_search, job_env, output_of, run_entry
from hydra_plugins.mame_lightning_cluster.launchers import (LocalParallelLauncher, SlurmLauncher, job_gpus,
                                                            rejection_message)
from mame_lightning.runs.multirun import expected_jobs
from mame_lightning.runs.training import resolve_ckpt_path
from mame_lightning.sweep import main as sweep_main
from helpers.training import CONF_DIR, prepare_small_synthetic


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_ddp_trainer_uses_lightnings_slurm_environment_with_requeue():
    cfg = compose_with_hydra(["trainer=slurm_ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    from lightning.fabric.plugins.environments import SLURMEnvironment

    (plugin,) = [instantiate(p) for p in cfg.trainer.plugins]
    assert isinstance(plugin, SLURMEnvironment) and plugin.auto_requeue
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2
    assert cfg.callbacks.slurm_requeue._target_ == "mame_lightning.cluster.preemption.RequeueAtStepBoundary"


def test_fsdp_trainer_builds_lightnings_strategy_with_a_policy_that_wraps_our_model_blocks():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    cfg = compose_with_hydra(["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and strategy.kwargs["use_orig_params"]
    components = instantiate(cfg.model)
    present = {type(m) for part in (components.unet, components.text_encoder) for m in part.modules()}
    assert set(policy._module_classes) <= present, "every wrapped class occurs in the model"


@pytest.mark.parametrize("search, searched", [
    ("optuna_lr", {"optimizer.lr"}),
    ("optuna", {"optimizer.lr", "dataset.batch_size", "trainer.accumulate_grad_batches", "trainer.max_steps",
                "task.module.prompt_dropout"}),
])
def test_hparams_search_configs_search_keys_the_training_config_has(search, searched):
    cfg = compose_with_hydra([f"hparams_search={search}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == searched
    for key in searched:
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not a key of the training config"
    assert cfg.optimized_metric == "val/loss" and str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_launcher_configs_build_our_submitit_launchers():
    slurm = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    launcher = instantiate(slurm)  # (Hydra's plugin scan may load the module a second time: compare names)
    assert type(launcher).__qualname__ == SlurmLauncher.__qualname__ and launcher.params["partition"] == "gpu"
    assert launcher.params["additional_parameters"] == {"signal": "USR1@90", "requeue": True}
    local = instantiate(compose_with_hydra(["hydra/launcher=local_parallel"]).hydra.launcher)
    assert type(local).__qualname__ == LocalParallelLauncher.__qualname__ and local.gpus_per_job == 1


def test_parallel_local_jobs_get_disjoint_gpus():
    gpus = ["0", "1", "2", "3"]
    assert [job_gpus(gpus, 1, 4, n) for n in range(5)] == [["0"], ["1"], ["2"], ["3"], ["0"]]
    assert [job_gpus(gpus, 2, 2, n) for n in (6, 7)] == [["0", "1"], ["2", "3"]]


@pytest.mark.parametrize("sbatch_error, key", [
    ("sbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed: Invalid partition "
     "name specified", "hydra.launcher.partition=nope"),
    ("sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job submission failed: Requested "
     "node configuration is not available", "hydra.launcher.mem_gb=64"),
    ("sbatch: error: Invalid generic resource (gres) specification", "hydra.launcher.gpus_per_node=8"),
])
def test_sbatch_refusals_name_the_launcher_key(sbatch_error, key):
    message = rejection_message(sbatch_error, {"partition": "nope", "mem_gb": 64, "gpus_per_node": 8})
    assert message.startswith(key) and "sbatch: error" in message


def test_expected_jobs_counts_as_the_sweepers_do():
    basic = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                                    "params": {"seed": "0,1"}},
                                        "overrides": {"task": ["optimizer.lr=1e-3,1e-4,1e-5", "trainer.max_steps=2"]}}})
    assert expected_jobs(basic) == 6
    optuna = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper."
                                                                 "OptunaSweeper", "n_trials": 4}}})
    assert expected_jobs(optuna) == 4
    assert expected_jobs(OmegaConf.create({"hydra": {"sweeper": {"_target_": "other.Sweeper"}}})) is None


def test_resume_auto_takes_the_newest_of_last_and_lightnings_requeue_checkpoint(tmp_path):
    cfg = OmegaConf.create({"trainer": {"default_root_dir": str(tmp_path)}, "resume": "auto", "ckpt_path": None})
    assert resolve_ckpt_path(cfg) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"state_dict": {}, "global_step": 1}, last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"state_dict": {}, "global_step": 2}, hpc)
    os.utime(last, (1000, 1000))
    os.utime(hpc, (2000, 2000))
    assert resolve_ckpt_path(cfg) == str(hpc)
    os.utime(last, (3000, 3000))
    assert resolve_ckpt_path(cfg) == str(last)


def test_summary_command_lists_jobs_that_left_no_record(tmp_path, capsys):
    jobs = tmp_path / ".sweep" / "jobs"
    jobs.mkdir(parents=True)
    (tmp_path / ".sweep" / "expected.json").write_text(json.dumps({"expected": 2}))
    (jobs / "0.json").write_text(json.dumps({"job": 0, "overrides": "optimizer.lr=0.001", "status": "ok",
                                             "objective": 0.5, "result": {"global_step": 2, "val_loss": 0.5}}))
    assert sweep_main([str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [(r["job"], r["status"]) for r in rows] == [(0, "ok"), (1, "no record (still running, or killed)")]
    assert rows[0]["global_step"] == 2 and "optimizer.lr=0.001" in (tmp_path / "sweep_summary.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sweep_main([str(empty)]) == 2
    assert "holds no multirun jobs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_root")
    return root, prepare_small_synthetic(root)


@pytest.mark.slow
def test_a_four_trial_optuna_search_returns_what_each_trial_logged(small_set, tmp_path):
    sweep = tmp_path / "search"
    proc = run_entry(*small_set, ["hparams_search=optuna_lr", "hydra.sweeper.n_trials=4", *TINY,
                                  f"hydra.sweep.dir={sweep}"], fixed_lr=False)
    assert proc.returncode == 0, output_of(proc)
    check_optuna_search(sweep, 4)


@pytest.mark.slow
def test_local_parallel_launcher_runs_jobs_side_by_side_as_submitit_jobs(small_set, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_entry(*small_set, ["-m", "hydra/launcher=local_parallel", "hydra.launcher.gpus_per_job=0",
                                  "hydra.launcher.max_parallel=2", "optimizer.lr=1e-3,1e-4", *TINY,
                                  f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, output_of(proc)
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [(r["status"], r["global_step"]) for r in rows] == [("ok", 2), ("ok", 2)]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2, "each job ran as a submitit local job"
    spans = [((sweep / str(n) / ".hydra").stat().st_mtime, (sweep / str(n) / "result.json").stat().st_mtime)
             for n in (0, 1)]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f"the two jobs ran one after the other: {spans}"
    helped = subprocess.run([sys.executable, "-m", "mame_lightning.sweep", "--help"], capture_output=True, text=True,
                            env=job_env(), timeout=60)
    assert helped.returncode == 0 and "multirun folder" in helped.stdout
