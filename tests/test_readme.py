"""Every `python -m mame_lightning.…` line of README.md runs as written, on tiny stand-ins for its placeholders.

Each line runs as a subprocess, the way a user types it, with the README's own arguments; only settings
the line does not mention are added, and only to make the run small (steps, image counts, a free port).
Training on real data sets or full-size models, and sweeps, are checked by composing their config
(`--cfg job`, every job of a sweep), since a real run takes hours. The demo line is checked by its
parser; tests/test_demo.py runs the quick demo itself.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.preparation import write_dicom, write_omi, write_vindr
from helpers.readme_commands import Command, fast, readme_commands, substitute_args
from helpers.training import CONF_DIR, FAST as TRAIN_FAST, SMALL_SYNTHETIC

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMMANDS = readme_commands()
TEMPLATE = "a {vendor} mammogram in {view} view with {density} density and {area} area"  # every attribute
SYNTHETIC = [*SMALL_SYNTHETIC[:3], "dataset.source.progress=false"]
FAST = {
    "mame_lightning.prepare": ["preparation.num_workers=0", "preparation.progress=false"],
    "mame_lightning.synth": ["progress=false"],
    "mame_lightning.train": [*SYNTHETIC, *TRAIN_FAST, "trainer.max_steps=2"],
    "mame_lightning.generate": ["device=cpu", "progress=false"],
    "mame_lightning.evaluate": ["device=cpu", "progress=false", "warmup=false", "guidance.steps=2",
                                "guidance.images_per_prompt=2", "max_prompts=1", "fidelity.images_per_prompt=1",
                                "fidelity.max_prompts=2", "inpaint_fidelity.n=2"],
    "mame_lightning.app": ["model.device=cpu"],
}
COMPOSE_ONLY_KEYS = ("dataset", "model", "experiment", "dataset.prepared_dir")  # real data or full-size models


def test_the_readme_shows_commands_of_every_entry_point():
    modules = {c.module for c in COMMANDS}
    assert {"mame_lightning.prepare", "mame_lightning.train", "mame_lightning.export", "mame_lightning.generate",
            "mame_lightning.app", "mame_lightning.evaluate"} <= modules
    assert any("guidance=4" in c.args for c in COMMANDS)


@pytest.fixture(scope="module")
def world(tmp_path_factory, inpaint_dir):
    """Stand-ins for the README's placeholders: raw sets, a trained run, an inpainting export, images."""
    from mame_lightning.data.prepare.preparation import prepare_from_config
    from mame_lightning.pipelines.generation import GenerationSettings, text2image
    from mame_lightning.pipelines.loading import load_model
    from mame_lightning.pipelines.outputs import save_results
    from mame_lightning.runs.training import train
    from helpers.training import compose_train

    from hydra import compose, initialize_config_dir

    root = tmp_path_factory.mktemp("readme")
    fixtures = root / "fixtures"
    template = f"dataset.templates.text2image='{TEMPLATE}'"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # PREPARED: 64 phantoms at 64 px
        cfg = compose("prepare", overrides=[f"paths.root={fixtures}", "dataset.source.n=64", *SYNTHETIC[1:],
                                            template, "preparation.num_workers=0", "preparation.progress=false"])
    prepare_from_config(cfg, echo=False)
    prepared = Path(cfg.dataset.prepared_dir)
    run = root / "run"  # RUN: a real two-step run (export/, checkpoints/last.ckpt, resolved_config.yaml)
    train(compose_train(run, fixtures, prepared, ["trainer.max_steps=2", "callbacks.sample_grid=null", template]))
    inpaint_run = root / "inpaint_run"
    inpaint_run.mkdir()
    (inpaint_run / "export").symlink_to(inpaint_dir, target_is_directory=True)

    generated = fixtures / "generated"  # GENERATED: synthetic images for the reader study
    model = load_model(run / "export", device="cpu")
    save_results(text2image(model, "a mammogram in CC view", 30, GenerationSettings(steps=2, progress=False)),
                 generated)

    raw = fixtures / "raw_in"  # IN: a folder of DICOMs
    write_dicom(raw / "patient1" / "cc.dcm", seed=1)
    write_dicom(raw / "patient1" / "IMG0002", view="MLO", laterality="R", seed=2)
    case = fixtures / "case.dcm"
    write_dicom(case, laterality="R", seed=3)
    vindr, omi = fixtures / "vindr-mammo", fixtures / "omi-db"
    write_vindr(vindr, [{"image_id": "aa01", "seed": 4}, {"image_id": "aa02", "lesions": ["mass"], "seed": 5}])
    write_omi(omi, [{"sop": "1.2.1", "seed": 6}, {"sop": "1.2.2", "view": "MLO", "seed": 7}])
    return {"root": root, "cmd_root": root / "mame_root", "RUN": run, "INPAINT_RUN": inpaint_run,
            "IN": raw, "case.dcm": case, "PREPARED": prepared, "GENERATED": generated,
            "/data/vindr-mammo": vindr, "/data/omi-db": omi, "study": root / "study"}


def places_for(command: Command, world: dict, work: Path) -> dict[str, str]:
    study = world["study"]
    if command.module == "mame_lightning.evaluate" and "mode=reader_score" in command.args:
        study = filled_study(world)
    places = {name: str(world[name]) for name in ("RUN", "INPAINT_RUN", "IN", "case.dcm", "PREPARED", "GENERATED",
                                                   "/data/vindr-mammo", "/data/omi-db")}
    places.update({"DIR": str(work / "dir"), "OUT": str(work / "out"), "STUDY": str(study),
                   "x0,y0,x1,y1": "20,30,70,90", "N": "4", "pt_inception.pth": str(work / "pt_inception.pth"),
                   "/data/prepared/vindr": str(world["root"] / "prepared" / "vindr"),
                   "/data/prepared/omi_h": str(world["root"] / "prepared" / "omi_h"),
                   "T2I_EXPORT": str(world["RUN"] / "export"), "INPAINT_EXPORT": str(world["INPAINT_RUN"] / "export")})
    return places


def filled_study(world: dict) -> Path:
    """STUDY with its ratings sheet filled in by a reader (made here if the README did not make it)."""
    study = world["study"]
    if not (study / "ratings.csv").is_file():
        from mame_lightning.eval.reader_study import make_reader_study

        real = sorted((world["PREPARED"] / "text2image" / "images").glob("*.png"))
        make_reader_study(real, sorted(world["GENERATED"].glob("*.png")), study, n=40)
    with open(study / "ratings.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = random.Random(0)
    with open(study / "ratings.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{**row, "score": rng.randint(0, 4)} for row in rows])
    return study


def environment(world: dict) -> dict[str, str]:
    return {**os.environ, "MAME_ROOT": str(world["cmd_root"]), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def run(argv: list[str], world: dict, work: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=work, env=environment(world), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def compose_only(command: Command) -> bool:
    return "-m" in command.args or "--multirun" in command.args or bool(command.key_set() & set(COMPOSE_ONLY_KEYS))


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """Each job of a Hydra sweep as plain overrides (Hydra's own parser expands the lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in args if a not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides(plain)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*choices)]


def check_composes(command: Command, args: list[str], world: dict, work: Path) -> None:
    jobs = sweep_jobs(args)
    assert len(jobs) <= 12, f"{command}: too many jobs to compose"
    for job in jobs:
        proc = run([command.module, *job, "--cfg", "job"], world, work, timeout=120)
        assert "_target_" in proc.stdout, command


def check_app(command: Command, args: list[str], world: dict, work: Path) -> None:
    """The server comes up and answers; SIGTERM stops it cleanly and removes its temporary folder."""
    import httpx
    from helpers.app import free_port

    port = free_port()
    env = {**environment(world), "TMPDIR": str(work)}
    proc = subprocess.Popen([sys.executable, "-m", command.module, *args, *fast(command, FAST[command.module]),
                             f"app.port={port}"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline, up = time.time() + 300, False
        while time.time() < deadline and proc.poll() is None and not up:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
            except httpx.HTTPError:
                time.sleep(1)
        assert up, f"{command}: the app did not come up\n{proc.stdout.read()[-3000:] if proc.poll() else ''}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stdout.read()[-3000:]
        assert not list(work.glob("mame_app_*")), "the temporary output folder is still there"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_sweep_summary(command: Command, world: dict, work: Path) -> None:
    """MULTIRUN_DIR: a real two-job tiny multirun, its summary removed; the command writes it again."""
    assert command.args == ("MULTIRUN_DIR",), command
    sweep = work / "multirun"
    run(["mame_lightning.train", "-m", *fast(command, FAST["mame_lightning.train"]), "trainer.max_steps=1,2",
         "callbacks.sample_grid=null", "export=false", f"hydra.sweep.dir={sweep}"], world, work)
    before = (sweep / "sweep_summary.md").read_text()
    for name in ("sweep_summary.md", "sweep_summary.csv", "sweep_summary.json"):
        (sweep / name).unlink(missing_ok=True)
    run([command.module, str(sweep)], world, work)
    summary = (sweep / "sweep_summary.md").read_text()
    assert summary == before and "trainer.max_steps=1" in summary and "trainer.max_steps=2" in summary


def check_outputs(command: Command, args: list[str], proc: subprocess.CompletedProcess, world: dict,
                  work: Path) -> None:
    """What each entry point promises to leave behind."""
    values = dict(a.split("=", 1) for a in args if "=" in a)
    if command.module == "mame_lightning.prepare":
        out = Path(values.get("dataset.prepared_dir") or next((world["cmd_root"] / "data").glob("*/prepared_*")))
        report = json.loads((out / "report.json").read_text())
        assert report["kept"] > 0, command
    elif command.module == "mame_lightning.train":
        result = json.loads((Path(values["hydra.run.dir"]) / "result.json").read_text())
        assert result["status"] == "finished" and (Path(result["export_dir"]) / "model_index.json").is_file()
    elif command.module == "mame_lightning.export":
        assert "exported diffusers pipeline to" in proc.stdout
        assert (Path(values["ckpt"]).parents[1] / "export" / "model_index.json").is_file()
    elif command.module == "mame_lightning.generate":
        with open(Path(values["out"]) / "images.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == int(values.get("n", 4)), command
        if "guidance" in values:
            assert {float(r["guidance"]) for r in rows} == {float(values["guidance"])}
    elif command.module == "mame_lightning.evaluate" and "out" in values:
        out = Path(values["out"])
        assert (out / "summary.json").is_file() or list(out.glob("*/summary.json")), command
    elif command.module == "mame_lightning.synth":
        assert (Path(values["out"]) / "manifest.json").is_file()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"line{c.line}-{c.module.split('.')[-1]}" for c in COMMANDS])
def test_readme_command_runs(command, world, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    args = substitute_args(command, places_for(command, world, work))
    if command.module == "mame_lightning.demo":  # tests/test_demo.py runs the quick demo itself
        proc = run([command.module, *args, "--help"], world, work, timeout=120)
        assert "--quick" in proc.stdout
        return
    if command.module == "mame_lightning.utility":  # minutes of work; tests/test_utility_cli.py runs it end to end
        check_composes(command, args, world, work)
        return
    if command.module == "mame_lightning.train" and compose_only(command):
        check_composes(command, args, world, work)
        return
    if command.module == "mame_lightning.app":
        check_app(command, args, world, work)
        return
    if command.module == "mame_lightning.sweep":
        check_sweep_summary(command, world, work)
        return
    extra = fast(command, FAST.get(command.module, []))
    if command.module == "mame_lightning.train":
        extra.append(f"hydra.run.dir={work / 'run'}")
    if command.module == "mame_lightning.prepare" and not command.key_set() & {"dataset.raw_dir"}:
        extra += fast(command, SYNTHETIC)
    proc = run([command.module, *args, *extra], world, work)
    check_outputs(command, [*args, *extra], proc, world, work)
