"""The utility study's parts: study split, metrics, saliency localisation, the classifier, synthesis."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from mame_lightning.data.loading.prepared_set import read_metadata
from mame_lightning.utility.checks import UtilityError
from mame_lightning.utility.classifier import LesionClassifier, probabilities
from mame_lightning.utility.fit import fit_classifier
from mame_lightning.utility.metrics import auroc, bootstrap_auroc_ci, sensitivity_at_specificity
from mame_lightning.utility.saliency import chance_level, localisation, peak, peak_in_boxes, saliency_maps
from mame_lightning.utility.split import real_samples, split_by_group, split_counts
from mame_lightning.utility.synthesis import SynthesisSettings, generate_synthetic, part_jobs, synthetic_samples
from helpers.utility import crafted_set, utility_config

pytestmark = pytest.mark.usefixtures("one_thread")

FRACTIONS = {"train": 0.6, "val": 0.15, "test": 0.25}


@pytest.fixture
def prepared(utility_prepared):
    return utility_prepared


# ---------------------------------------------------------------- split


def test_split_keeps_every_study_on_one_side_and_both_classes_everywhere(prepared):
    samples = real_samples(prepared)
    records = {r["id"]: r for task in ("text2image", "inpaint")
               for r in read_metadata(prepared / task / "metadata.jsonl", task)}
    assert len(samples) == len(records) and {s.origin for s in samples} == {"real"}
    # the group is the study folder of the source DICOM: vindr/images/<study>/, omi/images/<client>/<study>/
    for sample in samples:
        assert sample.group == "folder:" + records[sample.id]["source"].rsplit("/", 1)[0]
        assert bool(sample.boxes) == (sample.label == 1)
    assert len({s.group for s in samples}) < len(samples)  # studies hold several images
    sides = split_by_group(samples, FRACTIONS, seed=0)
    groups = {name: {s.group for s in items} for name, items in sides.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["val"]
    assert not groups["val"] & groups["test"]
    assert sum(len(items) for items in sides.values()) == len(samples)
    counts = split_counts(sides)
    assert all(c["lesion"] >= 1 and c["healthy"] >= 1 for c in counts.values())
    assert counts["train"]["images"] > counts["test"]["images"] > 0
    # the same seed gives the same split; another seed another one
    assert split_by_group(list(reversed(samples)), FRACTIONS, seed=0) == sides
    assert split_by_group(samples, FRACTIONS, seed=5)["test"] != sides["test"]


def test_a_metadata_field_naming_the_patient_wins_over_the_folder(prepared, tmp_path):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    for task in ("text2image", "inpaint"):
        path = copy / task / "metadata.jsonl"
        rows = read_metadata(path, task)
        path.write_text("".join(json.dumps({**r, "patient_id": f"P{i % 3}"}) + "\n" for i, r in enumerate(rows)))
    assert {s.group for s in real_samples(copy)} == {"patient_id:P0", "patient_id:P1", "patient_id:P2"}


def test_too_few_studies_for_the_split_is_an_error_naming_the_counts(prepared):
    samples = real_samples(prepared)
    lesion_groups = sorted({s.group for s in samples if s.label == 1})[:2]
    few = [s for s in samples if s.group in lesion_groups]
    with pytest.raises(UtilityError, match=r"too few .* gets 0 (lesion|healthy) image\(s\).*split.fractions"):
        split_by_group(few, FRACTIONS, seed=0, min_per_class=1)
    with pytest.raises(UtilityError, match="summing to 1"):
        split_by_group(samples, {"train": 0.9, "val": 0.2, "test": 0.1})


# ---------------------------------------------------------------- metrics


def test_sensitivity_at_specificity_and_auroc_on_a_hand_computed_case():
    labels = [0] * 10 + [1] * 5
    probs = [i / 10 for i in range(10)] + [0.95, 0.85, 0.5, 0.3, 0.99]
    # specificity >= 0.9 allows one healthy image above the threshold (0.9): three lesions score above 0.8
    sensitivity, threshold = sensitivity_at_specificity(probs, labels, 0.9)
    assert sensitivity == pytest.approx(0.6, abs=1e-6) and threshold == pytest.approx(0.85, abs=1e-6)
    pairs = [float(p > n) + 0.5 * (p == n) for p in probs[10:] for n in probs[:10]]
    assert auroc(probs, labels) == pytest.approx(np.mean(pairs))


def test_bootstrap_ci_brackets_the_auroc_and_pools_seeds():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 20)
    scores = rng.normal(labels * 1.0, 1.0)
    value = auroc(scores, labels)
    low, high = bootstrap_auroc_ci([scores], labels, n_resamples=300, seed=1)
    assert low < value < high and 0.1 < high - low < 0.5
    assert bootstrap_auroc_ci([scores], labels, 300, seed=1) == (low, high)  # seeded
    assert bootstrap_auroc_ci([scores, scores], labels, 300, seed=1) == pytest.approx((low, high))
    perfect = bootstrap_auroc_ci([labels + 0.0], labels, 50)
    assert perfect == (1.0, 1.0)
    with pytest.raises(ValueError, match="lesion and healthy"):
        bootstrap_auroc_ci([scores[:40]], labels[:40], 10)


# ---------------------------------------------------------------- saliency


class MeanBrightness(nn.Module):
    """Logit = mean of the (identity) feature map: its Grad-CAM and occlusion maps follow the brightness."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.features.weight)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.features(x)).mean(dim=(2, 3))


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_saliency_of_monai_visualize_peaks_on_the_bright_lesion(method):
    data = crafted_set(6, size=32, seed=3)
    lesions = data.lesion_indices
    module = LesionClassifier(MeanBrightness())
    maps = saliency_maps(module, data.images[lesions], method=method, target_layer="act", mask_size=8)
    assert maps.shape == (3, 32, 32)
    result = localisation(maps, [data.boxes[i] for i in lesions])
    assert result["share"] == 1.0 and result["n"] == 3 and result["flat_maps"] == 0
    # the same maps against boxes somewhere else localise nothing
    moved = [((x0 + 16) % 24, (y0 + 16) % 24, (x0 + 16) % 24 + 2, (y0 + 16) % 24 + 2)
             for ((x0, y0, _, _),) in (data.boxes[i] for i in lesions)]
    assert localisation(maps, [(b,) for b in moved])["share"] == 0.0


def test_peak_in_boxes_uses_the_pixels_the_mask_covers():
    saliency = np.zeros((8, 8), np.float32)
    saliency[3, 2] = 1.0
    assert peak(saliency) == (3, 2)
    assert peak_in_boxes(saliency, [(2.5, 2.5, 4.0, 4.0)])       # covers columns 2-3, rows 2-3
    assert not peak_in_boxes(saliency, [(3.0, 3.0, 5.0, 5.0)])    # column 2 is left of it
    assert peak_in_boxes(saliency, [(6, 6, 8, 8), (0, 3, 3, 4)])  # any of several boxes
    assert not peak_in_boxes(np.zeros((8, 8)), [(0, 0, 8, 8)])    # a flat map localises nothing


def test_chance_level_is_box_area_over_breast_area():
    from helpers.generation import breast_image
    from mame_lightning.data.tissue import tissue_mask

    image = breast_image(64, seed=1)
    tensor = torch.from_numpy(image).float().div(255).view(1, 1, 64, 64)
    expected = 64 / tissue_mask(image).sum()
    assert chance_level(tensor, [((10, 28, 18, 36),)]) == pytest.approx(expected, rel=1e-3)
    assert chance_level(tensor.repeat(2, 1, 1, 1), [((10, 28, 18, 36),), ((0, 0, 64, 64),)]) == pytest.approx(
        (expected + 1.0) / 2, rel=1e-3)  # a box larger than the breast counts as 1


# ---------------------------------------------------------------- the classifier


def _cfg(tmp_path, steps=4):
    return utility_config(f"out={tmp_path}", f"classifier.steps={steps}", "classifier.batch_size=16",
                          "classifier.lr=1e-2", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu")


def test_classifier_learns_a_trivially_separable_set_in_four_steps(tmp_path):
    train, val, test = crafted_set(64, seed=0), crafted_set(16, seed=1), crafted_set(200, seed=2)
    fitted = fit_classifier(_cfg(tmp_path), train, val, seed=0, run_dir=tmp_path / "run")
    assert fitted.steps == 4 and isinstance(fitted.module.network, nn.Module)
    assert type(fitted.module.network).__module__.startswith("monai.networks.nets")
    probs = probabilities(fitted.module, test.images)
    assert probs.shape == (200,) and float(probs.min()) >= 0 and float(probs.max()) <= 1
    assert auroc(probs, test.labels) > 0.9
    assert bootstrap_auroc_ci([probs], test.labels, 200)[0] > 0.8
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_shuffled_labels_give_chance_auroc(tmp_path):
    """Labels that carry nothing about the image: a classifier trained on shuffled labels, scored
    against independently shuffled test labels, sits at 0.5 up to sampling noise (400 cases: sd 0.03)."""
    generator = torch.Generator().manual_seed(7)
    train, val, test = crafted_set(64, seed=0), crafted_set(16, seed=1), crafted_set(400, seed=2)
    train.labels = train.labels[torch.randperm(len(train), generator=generator)]
    fitted = fit_classifier(_cfg(tmp_path), train, val, seed=0, run_dir=tmp_path / "run")
    shuffled = test.labels[torch.randperm(len(test), generator=generator)]
    probs = probabilities(fitted.module, test.images)
    value = auroc(probs, shuffled)
    low, high = bootstrap_auroc_ci([probs], shuffled, 200)
    assert abs(value - 0.5) < 0.12 and low < 0.5 < high


def test_equal_steps_whatever_the_training_set_size(tmp_path):
    cfg = _cfg(tmp_path, steps=3)
    small = fit_classifier(cfg, crafted_set(10), crafted_set(8, seed=1), seed=1, run_dir=tmp_path / "a")
    large = fit_classifier(cfg, crafted_set(90), crafted_set(8, seed=1), seed=1, run_dir=tmp_path / "b")
    assert small.steps == large.steps == 3


def test_best_val_selection_keeps_the_checkpointed_weights(tmp_path):
    cfg = _cfg(tmp_path, steps=4)
    cfg.classifier.select, cfg.classifier.val_every = "best_val", 2
    fitted = fit_classifier(cfg, crafted_set(32), crafted_set(16, seed=1), seed=0, run_dir=tmp_path / "run")
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert fitted.selected == "best_val" and fitted.steps == 4
    for name, value in fitted.module.state_dict().items():
        assert torch.equal(value, best["state_dict"][name]), name
    cfg.classifier.select = "first"
    with pytest.raises(ValueError, match="classifier.select='first'"):
        fit_classifier(cfg, crafted_set(8), crafted_set(8, seed=1), seed=0, run_dir=tmp_path / "bad")


# ---------------------------------------------------------------- synthesis


def test_synthesis_pairs_lesions_with_their_healthy_originals_and_is_reused(t2i_dir, inpaint_dir, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    settings = SynthesisSettings(steps=2, seed=40, box="24,24,32,32", device="cpu", budget_s=600)
    manifest = generate_synthetic(t2i_dir, inpaint_dir, 3, settings, tmp_path)
    assert not manifest["reused"] and [p["n"] for p in manifest["parts"]] == [1, 1, 1]
    assert [p["seed"] for p in manifest["parts"]] == [40, 41, 42]
    assert len({p["prompt"] for p in manifest["parts"]}) == 3  # attribute combinations spread over the pairs
    samples = synthetic_samples(tmp_path, manifest)
    assert Counter(s.label for s in samples) == {1: 3, 0: 3} and {s.origin for s in samples} == {"synthetic"}
    for lesion, healthy in zip(samples[::2], samples[1::2]):
        assert lesion.boxes == ((24.0, 24.0, 32.0, 32.0),) and healthy.boxes == ()
        a, b = (np.asarray(__import__("PIL.Image").Image.open(s.path), dtype=np.int16) for s in (lesion, healthy))
        changed = np.argwhere(a != b)
        assert len(changed) and changed.min() >= 24 - 8 and changed.max() < 32 + 8  # only around the box
    # a finished set is reused without loading a model; other settings regenerate
    monkeypatch.setattr("mame_lightning.utility.synthesis.load_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("models loaded again")))
    assert generate_synthetic(t2i_dir, inpaint_dir, 3, settings, tmp_path)["reused"]
    with pytest.raises(AssertionError, match="loaded again"):
        generate_synthetic(t2i_dir, inpaint_dir, 4, settings, tmp_path)


def test_part_jobs_time_the_first_pair_alone():
    assert part_jobs([("a", 3), ("b", 2)], 10) == [("a", 1, 10), ("a", 2, 11), ("b", 2, 13)]
    assert part_jobs([("a", 1)], 0) == [("a", 1, 0)]
