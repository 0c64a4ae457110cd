"""`python -m mame_lightning.evaluate`: guidance sweep, fidelity, FID, reader study, multirun, bad input."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from omegaconf import OmegaConf
from torch import nn

from helpers.generation import breast_image
from mame_lightning import CONF_DIR, evaluate
from mame_lightning.eval.msssim import pairwise_ms_ssim, read_guidance_sweep_csv
from mame_lightning.pipelines.generation import GenerationSettings, text2image
from mame_lightning.pipelines.marking import is_marked_synthetic, save_png
from mame_lightning.runs.evaluation.grids import sample_grid
from mame_lightning.runs.evaluation.inputs import (attribute_combinations, model_labels, spread, sweep_prompts,
                                                   sweep_scales)

pytestmark = pytest.mark.usefixtures("one_thread")

EVALUATE_BATCH = int(OmegaConf.load(Path(CONF_DIR) / "evaluate.yaml").batch_size)
FAST = ["guidance.steps=2", "guidance.images_per_prompt=3", "device=cpu", "progress=false"]
SIDECAR = {"task": "text2image", "templates": {"text2image": "a mammogram in {view} view with {area} area"},
           "attributes": {"views": ["CC", "MLO"], "areas": ["small", "medium", "big"]}, "prepare_size": 64}
# max_prompts=2 spreads over the 6 combinations: the first and the last
PROMPTS = ["a mammogram in CC view with small area", "a mammogram in MLO view with big area"]


@pytest.fixture(scope="session")
def eval_dir(t2i_dir, models_root):
    """The tiny text-to-image export with a two-attribute sidecar (view, area)."""
    folder = models_root / "eval_export"
    if not (folder / "model_index.json").is_file():
        shutil.copytree(t2i_dir, folder, dirs_exist_ok=True)
        (folder / "mame_lightning.json").write_text(json.dumps(SIDECAR))
    return folder


def run_cli(*args: str) -> None:
    """The entry point in this process, argv as the shell hands it over."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["evaluate", *args])
        evaluate.main()


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=evaluate.CONF_DIR, version_base="1.3"):
        return hydra_compose("evaluate", overrides=list(overrides))


def write_prepared(folder: Path, n: int) -> Path:
    """A prepared text2image folder: metadata.jsonl + images/, prompts in the model's phrasing."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(breast_image(64, seed=100 + i)).save(folder / "images" / f"r{i}.png")
        lines.append(json.dumps({"id": f"r{i}", "file_name": f"images/r{i}.png", "prompt": PROMPTS[i % 2],
                                 "split": "train"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def sweep_out(eval_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    run_cli(f"model_path={eval_dir}", f"out={out}", "sweep_scales=[4,8]", "max_prompts=2", *FAST)
    return out


def test_sweep_csv_has_a_row_per_prompt_and_scale_matching_a_fresh_generation(sweep_out, eval_dir):
    rows = read_guidance_sweep_csv(sweep_out / "sweep.csv")
    assert sorted((r["prompt"], r["guidance"]) for r in rows) == sorted((p, w) for p in PROMPTS for w in (4.0, 8.0))
    with open(sweep_out / "sweep.csv") as handle:
        header = next(csv.reader(handle))
    assert header[:7] == ["model", "prompt", "guidance", "ms_ssim_mean", "ms_ssim_std", "seconds_per_image", "n"]
    for row in rows:
        assert 0.0 <= row["ms_ssim_mean"] <= 1.0 and 0.0 <= row["ms_ssim_std"] <= 1.0
        assert row["n"] == 3 and int(row["pairs"]) == 3 and row["seconds_per_image"] > 0
    # the cell is the MS-SSIM of images drawn with seeds 0, 1, 2 at that scale, in the evaluation's batches
    # (conf/evaluate.yaml batch_size: one-by-one draws agree within a grey level, not bit for bit, on every CPU)
    from mame_lightning.pipelines.loading import load_model

    model = load_model(eval_dir, device="cpu")
    settings = GenerationSettings(guidance=8.0, steps=2, seed=0, progress=False, batch_size=EVALUATE_BATCH)
    images = [r.image for r in text2image(model, PROMPTS[1], 3, settings)]
    cell = next(r for r in rows if r["prompt"] == PROMPTS[1] and r["guidance"] == 8.0)
    assert cell["ms_ssim_mean"] == pytest.approx(pairwise_ms_ssim(images, progress=False).mean, abs=1e-6)
    # the sample grid's second row holds the same images
    grid = np.asarray(Image.open(sweep_out / "samples" / "eval_export" / "w8.png"))
    assert grid.shape == (64 * 2 + 2, 64 * 3 + 2 * 2)
    np.testing.assert_array_equal(grid[66:130, 66:130], images[1])
    assert is_marked_synthetic(sweep_out / "samples" / "eval_export" / "w8.png")


def test_markdown_table_has_one_column_per_scale(sweep_out):
    lines = [line for line in (sweep_out / "sweep.md").read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert [h for h in header if h.startswith("w=")] == ["w=4", "w=8"]
    assert header[-1] == "s/image" and len(lines) == 2 + len(PROMPTS)
    assert all(re.fullmatch(r"0\.\d{3} ± 0\.\d{3}", cell.strip()) for cell in lines[2].strip("|").split("|")[2:4])


def test_sweep_plot_is_a_real_figure(sweep_out):
    with Image.open(sweep_out / "msssim_vs_guidance.png") as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 5


def test_tensorboard_holds_msssim_against_guidance(sweep_out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = read_guidance_sweep_csv(sweep_out / "sweep.csv")
    events = EventAccumulator(str(sweep_out / "tensorboard" / "eval_export"))
    events.Reload()
    for prompt in PROMPTS:
        scalars = events.Scalars(f"msssim/{prompt}")
        assert [s.step for s in scalars] == [4, 8]
        expected = [next(r["ms_ssim_mean"] for r in rows if r["prompt"] == prompt and r["guidance"] == w)
                    for w in (4.0, 8.0)]
        assert [s.value for s in scalars] == pytest.approx(expected, abs=1e-6)
        assert len(events.Scalars(f"seconds_per_image/{prompt}")) == 2
    assert [image.step for image in events.Images("samples")] == [4, 8]


def test_same_seeds_give_the_same_table(sweep_out, eval_dir, tmp_path):
    from mame_lightning.runs.evaluation import evaluate_models

    cfg = compose(f"model_path={eval_dir}", f"out={tmp_path}", "max_prompts=2", "warmup=false", *FAST)
    again = evaluate_models(cfg, tmp_path, ["sweep"], [4, 8])["sweep"]["rows"]
    first = read_guidance_sweep_csv(sweep_out / "sweep.csv")
    def table(rows):
        return {(r["prompt"], float(r["guidance"])): (r["ms_ssim_mean"], r["ms_ssim_std"]) for r in rows}

    assert table(first).keys() == table(again).keys()
    for cell, values in table(first).items():
        assert values == pytest.approx(table(again)[cell], abs=1e-9)
    summary = summary_of(sweep_out)
    assert summary["mode"] == "sweep" and summary["scales"] == [4.0, 8.0]
    assert Path(summary["sweep"]["csv"]) == sweep_out / "sweep.csv"


def test_fidelity_report_counts_every_generated_image(eval_dir, tmp_path, capsys):
    run_cli(f"model_path={eval_dir}", f"out={tmp_path}", "mode=fidelity", "fidelity.images_per_prompt=1", *FAST)
    report = json.loads((tmp_path / "fidelity.json").read_text())
    assert report["n_images"] == 6 and report["prompts"] == 6
    area = report["attributes"]["area"]
    matrix = np.array(area["matrix"])
    assert matrix.sum() == 6 and area["n"] == 6
    assert area["agreement"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert matrix.sum(axis=1).tolist() == [2, 2, 2]  # each area asked for in 2 views
    assert area["chance"] == pytest.approx(1 / 3) and report["attributes"]["view"]["chance"] == 0.5
    with open(tmp_path / "fidelity_images.csv") as handle:
        measured = [row["measured_area"] for row in csv.DictReader(handle)]
    assert matrix.sum(axis=0).tolist() == [measured.count(label) for label in area["labels"]]
    printed = capsys.readouterr().out
    assert f"prompt fidelity — area agreement: {area['agreement']:.2f} (chance 0.33)" in printed
    for name in ("fidelity_area.png", "fidelity_view.png"):
        with Image.open(tmp_path / name) as image:
            assert min(image.size) > 100
    with Image.open(report["grid"]) as grid:  # one 64-px row per attribute combination
        assert grid.size[1] == 6 * 64 + 5 * 2 and len(report["grid_rows"]) == 6


def test_fidelity_through_stock_diffusers_measures_what_our_loader_measures(eval_dir, tmp_path):
    """pipeline=stock is StableDiffusionPipeline.from_pretrained(folder) and nothing else: same images."""
    ratios = {}
    for kind in ("stock", "project"):
        out = tmp_path / kind
        run_cli(f"model_path={eval_dir}", f"out={out}", "mode=fidelity", f"pipeline={kind}",
                "fidelity.images_per_prompt=1", "fidelity.measure_view=false", *FAST)
        report = json.loads((out / "fidelity.json").read_text())
        with open(out / "fidelity_images.csv") as handle:
            ratios[kind] = [float(row["area_ratio"]) for row in csv.DictReader(handle)]
        ratios[kind + "_scheduler"] = report["scheduler"]
    assert ratios["stock_scheduler"] == "stock StableDiffusionPipeline (DPMSolverMultistepScheduler)"
    assert ratios["project_scheduler"] == "dpmsolver++"
    assert ratios["stock"] == pytest.approx(ratios["project"], abs=1e-3) and len(ratios["stock"]) == 6


def test_fid_without_weights_skips_before_generating(eval_dir, tmp_path, capsys):
    real = write_prepared(tmp_path / "prepared" / "text2image", 4)
    out = tmp_path / "out"
    run_cli(f"model_path={eval_dir}", f"out={out}", "mode=fid", f"real_dir={real.parent}", *FAST)
    assert "FID/KID skipped: no local Inception weights" in capsys.readouterr().out
    assert summary_of(out)["fid"]["skipped"].startswith("FID/KID skipped")
    assert not (out / "generated").exists() and not (out / "fid.json").exists()


class PooledPixels(nn.Module):
    """Stand-in backbone for the FID wiring: 4x4 average-pooled intensities (48 features)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)


def test_fid_compares_generated_images_drawn_with_the_real_prompts(eval_dir, tmp_path):
    from mame_lightning.eval.fid import fid_kid
    from mame_lightning.runs.evaluation import run

    real = write_prepared(tmp_path / "real", 5)
    cfg = compose(f"model_path={eval_dir}", f"out={tmp_path}", "mode=fid", f"real_dir={real}", "eval.fid.n=4",
                  f"eval.fid.feature={{_target_:{__name__}.PooledPixels}}", *FAST)
    result = run(cfg)["fid"]["eval_export"]
    assert result["n_real"] == 5 and result["n_fake"] == 4
    with open(tmp_path / "generated" / "images.csv") as handle:
        index = list(csv.DictReader(handle))
    assert sorted(r["prompt"] for r in index) == sorted(PROMPTS * 2)  # the real prompts, cycled
    assert len({r["seed"] for r in index}) == 4
    fake = [np.asarray(Image.open(tmp_path / "generated" / r["file"])) for r in index]
    reals = [np.asarray(Image.open(p)) for p in sorted((real / "images").glob("*.png"))]
    assert result["fid"] == pytest.approx(fid_kid(reals, fake, feature=PooledPixels(), kid_subsets=100)["fid"])
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] == result["fid"]


def test_reader_study_round_trip_through_the_cli(tmp_path, capsys):
    real = write_prepared(tmp_path / "real", 4)
    fake = tmp_path / "fake"
    for i in range(4):
        save_png(breast_image(64, seed=200 + i), fake / f"g{i}.png", {"prompt": "x"})
    study = tmp_path / "study"
    run_cli("mode=reader_make", f"real_dir={real}", f"fake_dir={fake}", "n=6", f"out={study}")
    assert len(list((study / "images").glob("case_*.png"))) == 6
    key = json.loads((study / ".key" / "key.json").read_text())
    assert key["n_real"] == 3 and key["n_synthetic"] == 3
    # a reader who is always right (0 = definitely real, 4 = definitely synthetic), except for
    # calling one synthetic case "not sure"
    cases = key["cases"]
    synthetic = sorted(c for c, v in cases.items() if v["truth"] == "synthetic")
    scores = {c: 0 if v["truth"] == "real" else 4 for c, v in cases.items()}
    scores[synthetic[0]] = 2
    ratings = study / "filled.csv"
    ratings.write_text("case,score\n" + "".join(f"{c},{s}\n" for c, s in scores.items()))
    scored = tmp_path / "scored"
    run_cli("mode=reader_score", f"ratings={ratings}", f"key={study / '.key' / 'key.json'}", f"out={scored}")
    result = summary_of(scored)["reader_study"]
    assert result["auroc"] == pytest.approx(1.0) and result["n"] == 6 and result["cannot_tell"] == 1
    assert "AUROC 1.000 over 6 cases" in capsys.readouterr().out
    assert (scored / "roc.png").is_file() and summary_of(study)["reader_study"]["key"].endswith("key.json")


def test_all_modes_on_two_models_in_one_run(eval_dir, tmp_path, capsys):
    run_cli(f"model_path=[{eval_dir},{eval_dir}]", f"out={tmp_path}", "mode=all", "sweep_scales=[6]", "max_prompts=1",
            "guidance.images_per_prompt=2", "fidelity.images_per_prompt=1", "fidelity.max_prompts=2", "warmup=false",
            *FAST[:1], *FAST[2:])
    assert "FID/KID skipped: no real_dir given" in capsys.readouterr().out
    rows = read_guidance_sweep_csv(tmp_path / "sweep.csv")
    assert [(r["model"], r["guidance"], r["n"]) for r in rows] == [("eval_export", 6.0, 2), ("eval_export_2", 6.0, 2)]
    assert rows[0]["ms_ssim_mean"] == rows[1]["ms_ssim_mean"]  # one model twice, same seeds
    for label in ("eval_export", "eval_export_2"):
        assert json.loads((tmp_path / label / "fidelity.json").read_text())["n_images"] == 2
        assert (tmp_path / "tensorboard" / label).is_dir()
    summary = summary_of(tmp_path)
    assert set(summary["fidelity"]) == {"eval_export", "eval_export_2"} and "skipped" in summary["fid"]


def test_multirun_over_guidance_scale_gives_one_folder_per_scale(eval_dir, tmp_path):
    out = tmp_path / "multi"
    run_cli("-m", f"model_path={eval_dir}", f"out={out}", "guidance.scale=4,8", "max_prompts=1", "warmup=false",
            "guidance.images_per_prompt=2", *FAST[:1], *FAST[2:])
    jobs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_w4", "1_w8"]
    assert [[r["guidance"] for r in read_guidance_sweep_csv(job / "sweep.csv")] for job in jobs] == [[4.0], [8.0]]
    combined = read_guidance_sweep_csv(out / "sweep.csv")
    assert sorted(r["guidance"] for r in combined) == [4.0, 8.0]
    assert "| w=4 | w=8 |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize("args, expected", [
    (["model_path={tmp}/no_model"], "{tmp}/no_model"),
    (["model_path={model}", "mode=psnr"], "unknown mode 'psnr'; choose from sweep, fidelity, fid, all"),
    (["model_path={model}", "mode=fid", "real_dir={tmp}/empty"], "real_dir {tmp}/empty: no images"),
    (["model_path={model}", "mode=fid", "real_dir={tmp}/missing"], "real_dir not found: {tmp}/missing"),
    (["mode=reader_score", "ratings={tmp}/r.csv"], "ratings sheet not found: {tmp}/r.csv"),
    (["model_path={model}", "prompts=[{{view: XCCL}}]"], "unknown view 'XCCL'"),
])
def test_bad_input_is_a_one_line_error_naming_it(eval_dir, tmp_path, args, expected):
    (tmp_path / "empty").mkdir()
    fill = {"tmp": tmp_path, "model": eval_dir}
    with pytest.raises(SystemExit) as error:
        run_cli(*[a.format(**fill) for a in args], f"out={tmp_path / 'out'}", *FAST)
    assert expected.format(**fill) in str(error.value.code) and str(error.value.code).startswith("error: ")


def test_scales_explicit_multirun_and_default():
    cfg = compose("out=x")
    assert sweep_scales(cfg) == [4.0, 6.0, 8.0, 10.0, 12.0, 14.0]
    assert sweep_scales(compose("out=x", "guidance.scale=7.5"), ["guidance.scale=7.5", "out=x"]) == [7.5]
    assert sweep_scales(compose("out=x"), ["seed=1"]) == sweep_scales(cfg)  # a multirun over something else
    assert sweep_scales(compose("out=x", "sweep_scales=[5,9]"), ["guidance.scale=7"]) == [5.0, 9.0]


def test_prompts_from_attributes_are_checked_and_spread():
    metadata = dict(SIDECAR)
    combos = attribute_combinations(metadata)
    assert len(combos) == 6 and combos[0] == {"view": "CC", "area": "small"}
    assert spread(range(6), 3) == [0, 2, 5] and spread(range(3), 5) == [0, 1, 2]
    cfg = compose("out=x", "prompts=[{view: mlo, area: Small},'free text']")
    assert sweep_prompts(cfg, metadata) == ["a mammogram in MLO view with small area", "free text"]
    assert sweep_prompts(compose("out=x", "max_prompts=2"), metadata) == PROMPTS


def test_model_labels_are_short_and_unique(tmp_path):
    paths = [str(tmp_path / "run_a" / "export"), str(tmp_path / "b" / "run_a"),
             str(tmp_path / "run_c" / "checkpoints" / "last.ckpt")]
    assert model_labels(paths) == ["run_a", "run_a_2", "run_c_last"]


def test_sample_grid_pads_short_rows():
    grid = sample_grid([[np.full((4, 4), 9, np.uint8)] * 2, [np.full((4, 4), 7, np.uint8)]], gap=1)
    assert grid.shape == (9, 9) and grid[5, 0] == 7 and grid[5, 5] == 0 and grid[4, 0] == 0 and grid[0, 5] == 9
