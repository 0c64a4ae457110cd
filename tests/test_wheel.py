"""The package as users install it: a wheel in a fresh venv, its console commands run from outside the repository.

The wheel is built once (pip, no build isolation, no network) from the package sources alone, so a config
file or module missing from the package data shows up here. The fresh venv gets only the wheel; every
dependency is taken from the running interpreter's site-packages through a .pth file (torch is not
installed twice), and PYTHONPATH is cleared so nothing is imported from the source tree.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"mame-prepare": "prepare", "mame-train": "train", "mame-generate": "generate",
            "mame-evaluate": "evaluate", "mame-app": "app"}

pytestmark = pytest.mark.slow


def run(args, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", work / "dist", source], cwd=work)
    wheel = next((work / "dist").glob("mame_lightning-*.whl"))
    env_dir = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=work)
    python = env_dir / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work).stdout.strip()
    shared = [p for p in site.getsitepackages() if Path(p, "torch").is_dir()]
    assert shared, "the running interpreter has no torch to share"
    Path(purelib, "shared_dependencies.pth").write_text("\n".join(shared) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        cwd=work)
    return env_dir


def clean_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "MAME_ROOT": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_the_package_is_imported_from_the_wheel_with_its_configs(venv, tmp_path):
    code = ("import mame_lightning, pathlib; p = pathlib.Path(mame_lightning.__file__).parent; "
            "print(p); print(sorted(q.name for q in (p / 'conf' / 'logger').glob('*.yaml')))")
    out = run([venv / "bin/python", "-c", code], cwd=tmp_path, env=clean_env(tmp_path)).stdout.splitlines()
    assert Path(out[0]).is_relative_to(venv), out[0]
    assert out[1] == "['many.yaml', 'mlflow.yaml', 'tensorboard.yaml', 'wandb.yaml']"
    for command in COMMANDS:
        assert (venv / "bin" / command).is_file(), command


def test_every_command_answers_help_exactly_as_python_m(venv, tmp_path):
    env = clean_env(tmp_path)
    calls = [[venv / "bin" / command, "--help"] for command in COMMANDS]
    calls += [[venv / "bin/python", "-m", f"mame_lightning.{module}", "--help"] for module in COMMANDS.values()]
    with ThreadPoolExecutor(max_workers=2) as pool:  # each start is one core's work: two at a time
        outputs = list(pool.map(lambda args: run(args, cwd=tmp_path, env=env).stdout, calls))
    ours, theirs = outputs[:len(COMMANDS)], outputs[len(COMMANDS):]
    for command, mine, reference in zip(COMMANDS, ours, theirs):
        assert mine == reference, command
        assert "is powered by Hydra" in mine and "== Config ==" in mine, command
    train_help = ours[list(COMMANDS).index("mame-train")]
    assert "== Configuration groups ==" in train_help
    # every config group of the source tree, with every option, is inside the wheel
    conf = Path(__file__).resolve().parents[1] / "src/mame_lightning/conf"
    listed = dict(line.split(": ", 1) for line in
                  train_help.split("== Configuration groups ==")[1].split("== Config ==")[0].splitlines()
                  if ": " in line and not line.startswith("Compose"))
    for group in ("logger", "model", "dataset", "task", "optimizer", "precision", "trainer"):
        expected = sorted(f.stem for f in (conf / group).glob("*.yaml"))
        assert listed[group].split(", ") == expected, group


def test_prepare_then_one_training_step_from_outside_the_repository(venv, tmp_path):
    env = clean_env(tmp_path)
    tiny = ["dataset.source.n=24", "dataset.source.height=128", "dataset.source.width=104",
            "dataset.source.progress=false"]
    run([venv / "bin/mame-prepare", *tiny, "preparation.num_workers=0", "preparation.progress=false",
         f"hydra.run.dir={tmp_path / 'prepare_log'}"], cwd=tmp_path, env=env)
    prepared = tmp_path / "data/synthetic/prepared_64"
    assert len(list((prepared / "text2image/images").glob("*.png"))) >= 2
    run([venv / "bin/mame-train", *tiny, "trainer.max_steps=1", "dataset.batch_size=2", "dataset.val_max=2",
         "trainer.enable_progress_bar=false", "callbacks.sample_grid=null", "~logger", "callbacks.lr_monitor=null",
         "export=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env)
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()
    assert '"global_step": 1' in (tmp_path / "run/result.json").read_text()
