"""Every export carries a Hugging Face model card that huggingface_hub parses; push_to_hub up to the upload."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from mame_lightning.models.hub import HubError, check_push, push_folder
from mame_lightning.models.model_card import (
    base_model_of,
    card_metadata,
    effective_batch,
    example_prompts,
    model_card_text,
)
from mame_lightning.runs.training import train
from helpers.training import compose_train

SD15 = {"_target_": "mame_lightning.models.components.load_components", "path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
TINY = {"_target_": "mame_lightning.models.components.tiny_components"}
REQUIRED_TAGS = {"stable-diffusion", "mammography", "medical-imaging", "synthetic-data"}


def sidecar(model=SD15, task="text2image"):
    return {
        "task": task,
        "templates": {"text2image": "a {vendor} mammogram in {view} view with {density} density",
                      "inpaint": "a mammogram with a lesion"},
        "attributes": {"views": ["CC", "MLO"], "densities": ["low", "high"], "vendors": ["siemens"], "areas": []},
        "train_config": {"model": model, "dataset": {"name": "vindr", "batch_size": 8},
                         "trainer": {"max_steps": 100, "accumulate_grad_batches": 4, "devices": 2, "num_nodes": 1},
                         "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-5},
                         "precision": {"lightning": "16-mixed"}, "seed": 0},
        "data_counts": {"train": 30, "val": 2, "by_attribute": {"views": {"CC": 16, "MLO": 14}}},
        "prepare_size": 512, "ema_weights": True, "created": "2026-01-01T00:00:00+00:00",
    }


def load(text: str, tmp_path: Path) -> ModelCard:
    (tmp_path / "README.md").write_text(text, encoding="utf-8")
    return ModelCard.load(tmp_path / "README.md")


def test_card_of_an_sd15_fine_tune_parses_with_every_field(tmp_path):
    card = load(model_card_text(sidecar(), metrics={"train/loss": 0.123456789, "val/loss": 0.2}), tmp_path)
    data = card.data.to_dict()
    assert data["license"] == "creativeml-openrail-m" and data["library_name"] == "diffusers"
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["pipeline_tag"] == "text-to-image" and REQUIRED_TAGS <= set(data["tags"])
    text = card.text
    for expected in ("| dataset | vindr |", "| optimizer steps | 100 |", "| effective batch | 64 |",
                     "| learning rate | 1e-05 |", "| precision | 16-mixed |", "| views | CC: 16, MLO: 14 |",
                     "Template: `a {vendor} mammogram in {view} view with {density} density`",
                     "- `{view}`: `CC`, `MLO`", "- `a siemens mammogram in MLO view with high density`",
                     "| train/loss | 0.123457 |", "Not for diagnosis", "ConversionType `SYN`", "`synthetic=true`"):
        assert expected in text, expected


def test_card_of_a_tiny_inpainting_model_claims_no_base_model(tmp_path):
    card = load(model_card_text(sidecar(TINY, "inpaint")), tmp_path)
    data = card.data.to_dict()
    assert "base_model" not in data and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "image-to-image" and "inpainting" in data["tags"]
    assert "No metrics were recorded" in card.text and "StableDiffusionInpaintPipeline" in card.text


def test_card_settings_and_derivations():
    assert base_model_of({"model": {**SD15, "path": "/data/models/sd15"}}) is None  # local folder: origin unknown
    assert card_metadata(sidecar(), license="other", base_model="me/base")["base_model"] == "me/base"
    assert effective_batch({"devices": "auto"}, 8) is None and effective_batch({"devices": [0, 1]}, 8) == 16
    prompts = example_prompts("a mammogram in {view} view with {area} area",
                              {"views": ["CC", "MLO"], "areas": ["small", "medium", "big"]})
    assert len(prompts) == 4 and {"CC" in p for p in prompts} == {True, False}


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no token saved by `hf auth login` either
    return tmp_path


def test_push_settings_are_checked_before_anything_runs(no_token, monkeypatch):
    with pytest.raises(HubError, match="OWNER/NAME"):
        check_push("just-a-name")
    with pytest.raises(HubError, match="no Hugging Face token.*HF_TOKEN"):
        check_push("me/model", environ={})
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        check_push("me/model", environ={"HF_HUB_OFFLINE": "1"})
    assert check_push("me/model", environ={}) == "hf_test"


def test_training_without_a_token_fails_at_once(no_token, small_prepared, tmp_path, monkeypatch):
    root, prepared = small_prepared
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cfg = compose_train(tmp_path / "run", root, prepared, ["export.push_to_hub=me/mammo"])
    with pytest.raises(HubError, match="export.push_to_hub='me/mammo': no Hugging Face token"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing was built, trained or written


@pytest.mark.slow
def test_a_training_exports_a_card_and_hands_the_folder_to_the_hub(no_token, small_prepared, tmp_path, monkeypatch):
    root, prepared = small_prepared
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (self.token, repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):  # the upload itself needs the network: record what it was given
        folder = Path(kwargs["folder_path"])
        calls["upload"] = kwargs
        calls["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        calls["card"] = ModelCard.load(folder / "README.md")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    cfg = compose_train(tmp_path / "run", root, prepared, [
        "export.push_to_hub=me/mammo", "trainer.max_steps=2", "callbacks.sample_grid=null",
        "callbacks.lr_monitor=null", "~logger"])
    result = train(cfg)

    assert result["hub_url"] == "https://huggingface.co/me/mammo"
    assert calls["create"] == ("hf_test", "me/mammo", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["upload"]["repo_id"] == "me/mammo" and Path(calls["upload"]["folder_path"]) == Path(result["export_dir"])
    assert {"README.md", "mame_lightning.json", "model_index.json", "unet/config.json"} <= set(calls["files"])
    card = calls["card"]
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    assert f"| train/loss | {result['train_loss']:.6g} |" in card.text and "| global_step | 2 |" in card.text
    assert "| dataset | synthetic |" in card.text and "Images per attribute value (training images)" in card.text
    assert "- `a mammogram in CC view with small area`" in card.text

    # `python -m mame_lightning.export ckpt=...` writes the same card from the checkpoint and the run's files
    from mame_lightning.models.export import export_checkpoint

    again = ModelCard.load(export_checkpoint(tmp_path / "run/checkpoints/last.ckpt", tmp_path / "again") / "README.md")
    assert again.data.to_dict() == card.data.to_dict()
    assert f"| train/loss | {result['train_loss']:.6g} |" in again.text
    assert "Images per attribute value (prepared images)" in again.text and "| prepared images | " in again.text


def test_push_refuses_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(HubError, match="model_index.json"):
        push_folder(tmp_path, "me/x", token="t")
