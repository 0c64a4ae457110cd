"""Against a real one-node SLURM (munged, slurmctld, slurmd started by the slurm_cluster fixture):
sweeps as job arrays, srun DDP, preemption with requeue, Optuna trials as SLURM jobs, refused settings."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.cluster import SBATCH_TEMPLATE, SLURM_JOB, TINY, check_optuna_search, export_weights, job_env, output_of, run_entry, summary_rows, template_overrides, worst_difference
from helpers.training import prepare_small_synthetic, run_train, train_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_root")


@pytest.fixture(scope="module")
def prepared(root):
    return prepare_small_synthetic(root)


def test_sweep_runs_as_a_job_array_and_keeps_the_other_results_when_a_job_fails(slurm_cluster, root, prepared,
                                                                                tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_entry(root, prepared, ["-m", *SLURM_JOB, f"hydra.launcher.partition={slurm_cluster.partition}",
                                      "optimizer.lr=1e-3,1e-4,-1", *TINY, f"hydra.sweep.dir={sweep}"])
    assert proc.returncode != 0, "a failed job fails the multirun"
    rows = summary_rows(sweep)
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"], output_of(proc)
    assert rows[2]["status"].startswith("failed: ValueError: Invalid learning rate: -1")
    assert "Invalid learning rate" in rows[2]["log_tail"]
    assert "Invalid learning rate" in (sweep / "sweep_summary.md").read_text()

    array_ids = set()
    for row in rows:
        hydra_job = yaml.safe_load((Path(row["run_dir"]) / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]
        assert hydra_job["id"] == row["slurm_job_id"], "the job id SLURM gave is in the run folder"
        array_id, task = row["slurm_job_id"].split("_")
        array_ids.add(array_id)
        ended = slurm_cluster.wait_state(row["slurm_job_id"], {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
        assert ended["JobState"] == "COMPLETED"
    assert len(array_ids) == 1, "one job array for the sweep"
    for row in rows[:2]:
        assert json.loads((Path(row["run_dir"]) / "result.json").read_text())["global_step"] == 2
        assert row["global_step"] == 2 and row["objective"] is not None

    again = subprocess.run([sys.executable, "-m", "mame_lightning.sweep", str(sweep)], capture_output=True, text=True,
                           env=job_env(), timeout=120)
    assert again.returncode == 0, again.stderr
    assert summary_rows(sweep) == rows, "the command rebuilds the same summary from the folder"


@pytest.mark.parametrize("setting, key", [("hydra.launcher.partition=nope", "hydra.launcher.partition=nope"),
                                          ("hydra.launcher.mem_gb=64", "hydra.launcher.mem_gb=64")])
def test_a_setting_slurm_refuses_names_the_key(setting, key, slurm_cluster, root, prepared, tmp_path):
    proc = run_entry(root, prepared, ["-m", *SLURM_JOB, setting, "optimizer.lr=1e-3,1e-4", *TINY,
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=180)
    assert proc.returncode != 0
    message = [line for line in proc.stderr.splitlines() if "SLURM refused" in line]
    assert message and key in message[-1], output_of(proc)
    assert "sbatch: error" in message[-1]


def test_srun_two_tasks_with_slurm_ddp_gives_the_weights_of_two_process_ddp(slurm_cluster, root, prepared, tmp_path):
    common = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2", "trainer.deterministic=true",
              "callbacks.sample_grid=null"]
    under_slurm = tmp_path / "srun"
    # Lightning asks for --ntasks-per-node (it refuses a bare -n/--ntasks)
    cmd = ["srun", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=1G", "--time=10", "--kill-on-bad-exit=1",
           *train_command(root, prepared, ["trainer=slurm_ddp", *common, f"hydra.run.dir={under_slurm}"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=job_env())
    assert proc.returncode == 0, output_of(proc)
    log = proc.stdout + proc.stderr
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, "SLURM's two tasks are the two ranks"
    result = json.loads((under_slurm / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 2

    local = tmp_path / "ddp"
    run_train(root, prepared, ["trainer=ddp", *common, f"hydra.run.dir={local}"])
    worst = worst_difference(export_weights(under_slurm / "export"), export_weights(local / "export"))
    assert worst <= 1e-6, f"srun DDP and 2-process DDP differ by {worst}"


def _submit_template(cluster, root, prepared, name: str, overrides: list[str], log: Path) -> str:
    cmd = ["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
           "--cpus-per-task=1", "--mem=1G", "--time=10", f"--output={log}", str(SBATCH_TEMPLATE),
           *template_overrides(root, prepared, overrides)]
    env = {**job_env(), "PYTHON": sys.executable, "RUN_NAME": name}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _wait_for(path: Path, job_id: str, cluster, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state} before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_usr1_checkpoints_requeues_and_the_requeued_job_ends_with_uninterrupted_weights(slurm_cluster, root,
                                                                                        prepared, tmp_path):
    common = ["trainer.accelerator=cpu", "precision=32-true", "trainer.max_steps=20", "trainer.deterministic=true",
              "callbacks.sample_grid=null", "trainer.val_check_interval=100"]
    outputs = root / "outputs" / "train"
    straight = _submit_template(slurm_cluster, root, prepared, "straight", common, tmp_path / "straight.out")
    preempted = _submit_template(slurm_cluster, root, prepared, "preempted", common, tmp_path / "preempted.out")
    run_dir = outputs / "preempted"

    _wait_for(run_dir / "checkpoints" / "step-000002.ckpt", preempted, slurm_cluster, timeout=300)
    slurm_cluster.run("scancel", "--signal=USR1", preempted)
    deadline = time.time() + 120
    while (info := slurm_cluster.job(preempted)).get("Restarts") != "1" or info.get("JobState") != "PENDING":
        assert time.time() < deadline, f"not requeued: {info}\n{(tmp_path / 'preempted.out').read_text()}"
        time.sleep(0.3)
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in hpc] == ["hpc_ckpt_1.ckpt"], "Lightning saved its requeue checkpoint"
    assert not (run_dir / "result.json").exists(), "the preempted run did not finish"
    # a requeued job waits (Reason=BeginTime, about two minutes) before it may start again: start it now
    assert info.get("Reason") == "BeginTime", info
    slurm_cluster.run("scontrol", "update", f"JobId={preempted}", "StartTime=now")

    for job_id in (straight, preempted):
        info = slurm_cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
        assert info["JobState"] == "COMPLETED", f"{info}\n{(tmp_path / 'preempted.out').read_text()[-3000:]}"
    log = (tmp_path / "preempted.out").read_text()
    assert "(restart 1)" in log and "Restored all states from the checkpoint" in log
    assert json.loads((run_dir / "result.json").read_text())["global_step"] == 20
    worst = worst_difference(export_weights(outputs / "straight" / "export"), export_weights(run_dir / "export"))
    assert worst <= 1e-6, f"requeued weights differ from the uninterrupted run by {worst}"


def test_optuna_search_runs_its_trials_as_slurm_jobs(slurm_cluster, root, prepared, tmp_path):
    sweep = tmp_path / "search"
    proc = run_entry(root, prepared, ["hparams_search=optuna_lr", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                                      *SLURM_JOB, *TINY, f"hydra.sweep.dir={sweep}"], fixed_lr=False)
    assert proc.returncode == 0, output_of(proc)
    rows = check_optuna_search(sweep, 4)
    arrays = {r["slurm_job_id"].split("_")[0] for r in rows}
    assert len(arrays) == 2, "two batches of two trials, one job array each"


def test_a_preempted_sweep_job_is_requeued_by_lightning_and_the_sweep_still_ends_ok(slurm_cluster, root, prepared,
                                                                                    tmp_path):
    sweep = tmp_path / "sweep"
    cmd = train_command(root, prepared, ["-m", *SLURM_JOB, "optimizer.lr=1e-3", "trainer.max_steps=20",
                                         "trainer.val_check_interval=100", "callbacks.sample_grid=null",
                                         "export=false", f"hydra.sweep.dir={sweep}"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env())
    try:
        deadline = time.time() + 300
        while not (sweep / "0" / "checkpoints" / "step-000002.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, "the sweep job did not reach step 2"
            time.sleep(0.2)
        job_id = yaml.safe_load((sweep / "0" / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]
        slurm_cluster.run("scancel", "--signal=USR1", job_id)
        while (info := slurm_cluster.job(job_id)).get("Restarts") != "1" or info.get("JobState") != "PENDING":
            assert time.time() < deadline, f"not requeued: {info}"
            time.sleep(0.3)
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    (row,) = summary_rows(sweep)
    assert row["status"] == "ok" and row["global_step"] == 20 and row["slurm_job_id"] == job_id
    assert (sweep / "0" / "hpc_ckpt_1.ckpt").is_file()
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.err"))
    assert "Restored all states from the checkpoint" in logs and "hpc_ckpt_1.ckpt" in logs
