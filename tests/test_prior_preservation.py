"""`prior=on`: DreamBooth prior preservation with class images the base model draws once.

Checked: the class images are the base model's own samples (drawn through the project's generation
code), made once and reused by a later run and on resume; training batches hold training rows and
class rows with `is_prior`; the loss of such a batch is the training rows' MSE plus
`prior_loss_weight` times the class rows' MSE, recomputed here from the same random draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers.loss_replay import module_loss, replay
from helpers.training import compose_train, run_train
from mame_lightning.models.building import build_components, build_module
from mame_lightning.pipelines import class_images as class_images_lib
from mame_lightning.pipelines.marking import is_marked_synthetic
from mame_lightning.runs import prior_preservation

pytestmark = pytest.mark.usefixtures("one_thread")

PRIOR = ["prior=on", "prior.num_class_images=3", "prior.steps=2", "prior.batch_size=2"]
CC = "prior.class_prompt='a mammogram in CC view'"


@pytest.fixture
def draws(monkeypatch):
    """Counts the times the base model is asked to draw class images."""
    calls = []
    original = class_images_lib.draw_class_images

    def counted(*args, **kwargs):
        calls.append(args[1].num_images)
        return original(*args, **kwargs)

    monkeypatch.setattr(class_images_lib, "draw_class_images", counted)
    return calls


@pytest.fixture(scope="module")
def prior_setup(small_prepared, tmp_path_factory):
    """(config, base components, class image folder) of a prior=on run, the folder drawn once."""
    root, prepared = small_prepared
    cfg = compose_train(tmp_path_factory.mktemp("prior") / "run", root, prepared,
                        [*PRIOR, CC, "task.module.prior_loss_weight=0.25", "dataset.batch_size=2"])
    components = build_components(cfg)
    return cfg, components, prior_preservation.class_images(cfg, components)


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_class_images_are_drawn_once_then_reused_by_a_later_run(prior_setup, draws):
    cfg, _, folder = prior_setup
    before = mtimes(folder)
    assert folder.parent == Path(cfg.paths.cache_dir) / "class_images"
    again = prior_preservation.class_images(cfg, build_components(cfg))  # a later run: the same base, built anew
    assert again == folder and draws == [] and mtimes(folder) == before
    info = json.loads((folder / class_images_lib.CLASS_IMAGES_FILE).read_text())
    assert info["count"] == 3 and info["settings"]["prompt"] == "a mammogram in CC view"
    assert info["model"]["weights"], "a local base folder is known by its weight files too"


def test_another_seed_or_base_model_gets_its_own_class_images(prior_setup, draws):
    cfg, components, folder = prior_setup
    settings = prior_preservation.check_prior(cfg)
    identity = class_images_lib.model_identity(components.source)
    other_seed = class_images_lib.ClassImageSettings(**{**settings.__dict__, "seed": 5})
    assert class_images_lib.class_image_folder(cfg.prior.cache_dir, identity, other_seed) != folder
    other_base = class_images_lib.model_identity(components.source, variant="fp16")
    assert class_images_lib.class_image_folder(cfg.prior.cache_dir, other_base, settings) != folder
    assert draws == []


def test_class_images_are_the_base_models_own_samples(prior_setup):
    cfg, components, folder = prior_setup
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1, 2] and {r["prompt"] for r in rows} == {"a mammogram in CC view"}
    modes = [(m.training, next(m.parameters()).device) for m in (components.unet, components.text_encoder)]
    again = class_images_lib.draw_class_images(components, prior_preservation.check_prior(cfg), "cpu", progress=False)
    for row, drawn in zip(rows, again):
        path = folder / row["file_name"]
        assert is_marked_synthetic(path)
        with Image.open(path) as image:
            assert image.size == (64, 64)
            assert np.array_equal(np.asarray(image), drawn.image)  # seed + i, reproducible one by one
    assert len({np.asarray(Image.open(folder / r["file_name"])).tobytes() for r in rows}) == 3
    assert modes == [(m.training, next(m.parameters()).device) for m in (components.unet, components.text_encoder)]


@pytest.fixture(scope="module")
def prior_batch(prior_setup):
    from mame_lightning.runs.training import build_datamodule

    from omegaconf import OmegaConf

    cfg, components, folder = prior_setup
    pixels = OmegaConf.merge(cfg, {"dataset": {"latent_cache": False}})  # pixel rows (the cache has its own test)
    datamodule = build_datamodule(pixels, components)
    assert datamodule.prior_images == folder
    datamodule.setup("fit")
    return datamodule, next(iter(datamodule.train_dataloader()))


def test_batches_carry_training_rows_then_class_rows(prior_setup, prior_batch):
    cfg, components, folder = prior_setup
    datamodule, batch = prior_batch
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and len(batch["input_ids"]) == 4
    assert all(p != "a mammogram in CC view" for p in batch["prompt"][:2])
    assert batch["prompt"][2:] == ["a mammogram in CC view"] * 2
    class_ids = components.tokenizer("a mammogram in CC view", padding="max_length",
                                     max_length=components.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
    assert torch.equal(batch["input_ids"][2], class_ids) and torch.equal(batch["input_ids"][3], class_ids)
    # a class row holds its PNG's pixels, in the [-1, 1] form of the training rows
    with Image.open(folder / "images" / f"{batch['id'][2]}.png") as image:
        expected = torch.from_numpy(np.asarray(image.convert("L"))).float() / 127.5 - 1
    assert torch.allclose(batch["pixel_values"][2, 0], expected)
    assert datamodule.counts()["train"] == len(datamodule.train_dataset.instances)  # class images are extra


def test_with_the_latent_cache_class_rows_come_as_cached_latents_too(prior_setup, tmp_path):
    from omegaconf import OmegaConf

    from mame_lightning.runs.training import build_datamodule

    cfg, components, folder = prior_setup
    cached = OmegaConf.merge(cfg, {"dataset": {"latent_cache": {"dir": str(tmp_path / "latents")}}})
    datamodule = build_datamodule(cached, components)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert "pixel_values" not in batch and batch["latent_mean"].shape == (4, 4, 16, 16)
    assert len(list((tmp_path / "latents").iterdir())) == 2  # one cache for the training set, one for the class images


def test_the_loss_is_the_training_mse_plus_the_weighted_class_mse(prior_setup, prior_batch):
    cfg, components, _ = prior_setup
    _, batch = prior_batch
    module = build_module(cfg, components)
    assert module.hparams.prior_loss_weight == 0.25
    loss, parts = module_loss(module, batch, seed=3), replay(module, batch, seed=3)
    prediction, target = parts["prediction"], parts["epsilon"]
    by_hand = F.mse_loss(prediction[:2], target[:2]) + 0.25 * F.mse_loss(prediction[2:], target[2:])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.mse_loss(prediction, target).item(), rel=1e-3)


def test_prior_preservation_is_refused_outside_text_to_image(small_prepared, tmp_path):
    root, prepared = small_prepared
    cfg = compose_train(tmp_path / "run", root, prepared, ["prior=on", "task=inpaint"])
    with pytest.raises(prior_preservation.PriorConfigError, match="task=text2image"):
        prior_preservation.check_prior(cfg)
    off = compose_train(tmp_path / "run", root, prepared, [])
    assert off.prior.enabled is False and prior_preservation.check_prior(off) is None
    with pytest.raises(prior_preservation.PriorConfigError, match="num_class_images=0"):
        prior_preservation.check_prior(compose_train(tmp_path / "run", root, prepared,
                                                     ["prior=on", "prior.num_class_images=0"]))


def test_the_entry_point_refuses_prior_preservation_for_inpainting_in_one_line(small_prepared, tmp_path):
    import subprocess

    from helpers.training import train_command

    root, prepared = small_prepared
    proc = subprocess.run(train_command(root, prepared, ["prior=on", "task=inpaint", f"hydra.run.dir={tmp_path}"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: prior=on works with task=text2image")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_prior_run_trains_and_its_resume_reuses_the_class_images(small_prepared, tmp_path):
    root, prepared = small_prepared
    run = tmp_path / "run"
    prior = [*PRIOR, "prior.class_prompt='a mammogram in MLO view'", f"hydra.run.dir={run}"]
    run_train(root, prepared, [*prior, "trainer.max_steps=2"])
    [folder] = [f for f in (root / "data" / "cache" / "class_images").iterdir() if "mlo" in f.name]
    before = mtimes(folder)
    assert len(list((folder / "images").glob("*.png"))) == 3
    proc = run_train(root, prepared, [*prior, "trainer.max_steps=4", "resume=auto"])
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["global_step"] == 4
    assert mtimes(folder) == before
    assert "reusing 3 class images" in proc.stdout + proc.stderr
