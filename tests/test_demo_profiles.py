"""The demo's profiles (conf/demo/*.yaml): every stage command composes with Hydra as its entry point
composes it and carries the profile's sizes; a broken profile is refused naming its file and key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from mame_lightning import CONF_DIR
from mame_lightning.runs.demo import SCHEDULE, DemoError, load_profile, stages

CONFIG_OF = {"mame_lightning.prepare": "prepare", "mame_lightning.train": "train",
             "mame_lightning.evaluate": "evaluate", "mame_lightning.generate": "generate"}


def composed(stage):
    """The config the stage's command line composes (its module's primary config plus its overrides)."""
    module, *overrides = stage.args
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(CONFIG_OF[module], overrides=overrides)


@pytest.mark.parametrize("name", ["full", "quick"])
def test_every_stage_of_a_profile_composes_with_its_sizes(name, tmp_path):
    profile = load_profile(name)
    by_key = {stage.key: stage for stage in stages(tmp_path, profile, prepared=tmp_path / "prepared")}
    assert {key for step in SCHEDULE for lane in step for key in lane.split("+")} == set(by_key)
    configs = {key: composed(stage) for key, stage in by_key.items()}
    assert list(configs["sweep"].guidance.scales) == profile.sweep_scales
    assert configs["sweep"].guidance.images_per_prompt == profile.sweep_images
    assert configs["fidelity"].fidelity.images_per_prompt == profile.fidelity_images
    assert configs["inpaint_fidelity"].inpaint_fidelity.n == profile.inpaint_cases
    assert {configs[k].guidance.steps for k in ("sweep", "fidelity", "inpaint_fidelity")} == {profile.steps}
    assert configs["full"].steps == profile.steps
    for key in ("autoencoder", "text2image", "inpaint"):
        assert all(override in by_key[key].args for override in profile.train_overrides)
        assert configs[key].trainer.enable_progress_bar is False
    max_steps = {configs[k].trainer.max_steps for k in ("autoencoder", "text2image", "inpaint")}
    assert (max_steps == {4}) == (name == "quick")  # the quick profile cuts every training stage short


@pytest.mark.parametrize("text, key", [
    ("fidelity_images: 1\ninpaint_cases: 2\nsweep_scales: [4]\nsweep_images: 2\nsteps: many\n", "steps"),
    ("fidelity_images: 1\ninpaint_cases: 2\nsweep_scales: [4]\nsweep_images: 2\n", "steps"),
    ("fidelity_images: 1\ninpaint_cases: 2\nsweep_scales: [4]\nsweep_images: 2\nsteps: 2\nstep: 3\n", "step"),
])
def test_a_broken_profile_is_refused_naming_file_and_key(tmp_path, text, key):
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(DemoError) as error:
        load_profile("mine", tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'mine.yaml'}: {key}:") and "\n" not in message


def test_an_unknown_profile_lists_the_profiles():
    with pytest.raises(DemoError, match=r"no demo profile 'fast' .*profiles: full, quick"):
        load_profile("fast")
