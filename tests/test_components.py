"""Model components: the tiny build is a real diffusers folder, loaded by the SD v1.5 loading code."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mame_lightning.models import components as comp
from mame_lightning.models.components import (
    ModelLoadError,
    SDComponents,
    build_models,
    load_components,
    tiny_components,
    widen_conv_in,
)
from mame_lightning.models.tokenizer import build_tokenizer

CONF = Path(comp.__file__).parents[1] / "conf"


def model_conf(name: str):
    cfg = OmegaConf.create({"paths": OmegaConf.load(CONF / "paths" / "default.yaml"),
                            "model": OmegaConf.load(CONF / "model" / f"{name}.yaml")})
    return cfg


@pytest.fixture(scope="module")
def tiny_cfg():
    cfg = OmegaConf.to_container(model_conf("tiny").model)
    for key in ("_target_", "cache_dir", "inpaint", "variant", "frozen_dtype", "train_text_encoder", "vae_path"):
        cfg.pop(key)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny(cache, tiny_cfg):
    return tiny_components(cache, **tiny_cfg)


def test_tiny_yaml_is_a_factory_call_that_builds_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("MAME_ROOT", str(tmp_path))
    parts = instantiate(model_conf("tiny").model)
    assert isinstance(parts, SDComponents)
    assert isinstance(parts.unet, UNet2DConditionModel) and isinstance(parts.vae, AutoencoderKL)
    assert isinstance(parts.text_encoder, CLIPTextModel) and isinstance(parts.tokenizer, CLIPTokenizer)
    assert isinstance(parts.noise_scheduler, DDPMScheduler)
    folder = Path(parts.source)
    assert folder.parent == tmp_path / "data" / "cache" / "models"
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    image = pipe("a mammogram in mlo view with big area", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    assert (image >= 0).all() and (image <= 1).all()


def test_training_schedule_has_sd_values_after_the_dpm_solver_round_trip(tiny):
    expected = DDPMScheduler(**comp.load_noise_schedule())
    assert torch.equal(tiny.noise_scheduler.alphas_cumprod, expected.alphas_cumprod)
    assert tiny.noise_scheduler.config.prediction_type == "epsilon"
    assert tiny.noise_scheduler.config.variance_type == "fixed_small"


def test_tiny_build_is_cached_by_config(cache, tiny, tiny_cfg):
    again = tiny_components(cache, **tiny_cfg)
    assert again.source == tiny.source
    assert torch.equal(again.unet.conv_in.weight, tiny.unet.conv_in.weight)
    other = tiny_components(cache, **{**tiny_cfg, "seed": 1})
    assert other.source != tiny.source
    assert not torch.equal(other.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert not list(Path(cache).glob(".*tmp*")), "temporary build folders were left behind"


def test_tokenizer_gives_one_token_per_prompt_word(tiny):
    tok = tiny.tokenizer
    ids = tok("a mammogram in MLO view with big area").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    words = "a mammogram in mlo view with big area".split()
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in words]
    padded = tok("a mammogram", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and tok.pad_token_id == tok.eos_token_id
    assert tiny.text_encoder.config.eos_token_id == tok.eos_token_id
    assert tiny.text_encoder.config.vocab_size == len(tok)


def test_tokenizer_falls_back_to_characters_for_unknown_text(tiny_cfg):
    tok = build_tokenizer(tiny_cfg["words"])
    for word in tiny_cfg["words"]:
        assert tok.tokenize(word) == [word + "</w>"], word
    text = "zebra-42 crème"
    assert len(tok.tokenize("zebra")) > 1
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")


def test_tokenizer_padded_to_clip_vocabulary_size():
    tok = build_tokenizer(["a", "mammogram"], pad_to=49408)
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert tok.tokenize("a mammogram") == ["a</w>", "mammogram</w>"]
    with pytest.raises(ValueError, match="pad_to"):
        build_tokenizer(["a", "mammogram"], pad_to=100)


def test_fp16_variant_loads_with_float32_trainable_parts(cache, tiny_cfg, tiny):
    parts = tiny_components(cache, **tiny_cfg, variant="fp16", frozen_dtype="float16")
    folder = Path(parts.source)
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert {p.dtype for p in parts.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in parts.text_encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in parts.vae.parameters()} == {torch.float16}
    assert all(p.requires_grad for p in parts.unet.parameters())
    assert all(p.requires_grad for p in parts.text_encoder.parameters())
    assert not any(p.requires_grad for p in parts.vae.parameters())
    # The weights came from the fp16 files: the fp32 originals rounded to half precision.
    full = load_components(str(folder))
    w16, w32 = parts.unet.conv_in.weight, full.unet.conv_in.weight
    assert w32.dtype == torch.float32 and not torch.equal(w16, w32)
    assert torch.equal(w16, w32.half().float())

    frozen_text = load_components(str(folder), variant="fp16", frozen_dtype="bfloat16", train_text_encoder=False)
    assert {p.dtype for p in frozen_text.text_encoder.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in frozen_text.text_encoder.parameters())
    assert {p.dtype for p in frozen_text.unet.parameters()} == {torch.float32}


def test_save_pretrained_round_trip(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "export")
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    scheduler = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DPMSolverMultistepScheduler"
    assert scheduler["algorithm_type"] == "dpmsolver++"
    back = load_components(str(tmp_path / "export"))
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert torch.equal(back.noise_scheduler.alphas_cumprod, tiny.noise_scheduler.alphas_cumprod)


def test_widen_conv_in_keeps_the_function_on_the_first_four_channels(tiny):
    original = tiny.unet.eval()
    wide = widen_conv_in(copy.deepcopy(original), 9)
    assert wide.config.in_channels == 9 and wide.conv_in.in_channels == 9
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    extra = torch.randn(2, 5, 16, 16, generator=gen) * 10
    text = torch.randn(2, 77, original.config.cross_attention_dim, generator=gen)
    steps = torch.tensor([10, 900])
    with torch.no_grad():
        expected = original(latents, steps, text).sample
        got = wide(torch.cat([latents, extra], dim=1), steps, text).sample
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert wide.conv_in.weight[:, 4:].abs().max() == 0
    with pytest.raises(ValueError, match="narrow"):
        widen_conv_in(wide, 4)


@pytest.mark.parametrize("init, scale", [("copy", 1.0), ("half", 0.5)])
def test_widen_conv_in_can_start_from_the_latent_weights(tiny, init, scale):
    old = tiny.unet.conv_in.weight.detach().clone()
    wide = widen_conv_in(copy.deepcopy(tiny.unet), 9, init)
    weight = wide.conv_in.weight.detach()
    assert torch.equal(weight[:, :4], old * scale) and torch.equal(weight[:, 5:9], old * scale)
    assert weight[:, 4].abs().max() == 0  # the mask channel starts at zero
    with pytest.raises(ValueError, match="conv_in init"):
        widen_conv_in(copy.deepcopy(tiny.unet), 9, "random")


def test_load_components_widens_a_text_to_image_unet_for_inpainting(tmp_path, tiny):
    parts = load_components(tiny.source, inpaint_in_channels=9)
    assert parts.unet.config.in_channels == 9 and parts.is_inpaint
    assert torch.equal(parts.unet.conv_in.weight[:, :4], tiny.unet.conv_in.weight)
    parts.save_pretrained(tmp_path / "inpaint")
    index = json.loads((tmp_path / "inpaint" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert load_components(str(tmp_path / "inpaint")).unet.config.in_channels == 9


def test_unknown_hub_id_offline_gives_a_clear_error():
    with pytest.raises(ModelLoadError) as info:
        load_components("mame-nobody/no-such-model", local_files_only=True)
    message = str(info.value)
    assert "mame-nobody/no-such-model" in message and "model.pretrained=" in message


def test_missing_folder_and_missing_tokenizer_are_refused(tmp_path, tiny):
    with pytest.raises(ModelLoadError, match="there is no folder"):
        load_components(str(tmp_path / "absent"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny.source, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_components(str(broken))


def test_folder_without_the_variant_names_it(tiny):
    with pytest.raises(ModelLoadError, match="bf16"):
        load_components(tiny.source, variant="bf16")


def test_bad_frozen_dtype_and_mismatched_widths_are_refused(tiny, tiny_cfg):
    with pytest.raises(ValueError, match="frozen_dtype"):
        load_components(tiny.source, frozen_dtype="float17")
    with pytest.raises(ValueError, match="cross_attention_dim"):
        build_models(**{**tiny_cfg, "unet": {**tiny_cfg["unet"], "cross_attention_dim": 48}})


def test_sd15_architecture_has_the_published_parameter_counts():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    arch = comp.load_architecture("sd15_arch")  # conf/model/sd15_arch.yaml
    latent = arch["sample_size"] // 8
    text = dict(arch["text_encoder"])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"], sample_size=latent)
        inpaint_unet = UNet2DConditionModel(**arch["unet"], sample_size=latent, in_channels=9)
        vae = AutoencoderKL(**arch["vae"], sample_size=arch["sample_size"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    assert count(unet) == pytest.approx(859.52e6, rel=0.005)
    assert count(inpaint_unet) - count(unet) == 5 * 320 * 9
    assert count(vae) == pytest.approx(83.65e6, rel=0.005)
    assert count(text_encoder) == pytest.approx(123.06e6, rel=0.005)


def test_sd15_arch_yaml_calls_the_full_size_factory():
    model = model_conf("sd15_arch").model
    assert model._target_ == "mame_lightning.models.components.sd15_arch_components"
    words = OmegaConf.to_container(model.words)
    assert all(isinstance(word, str) for word in words), "a bare no/on in YAML reads as a boolean"
    assert words == OmegaConf.to_container(model_conf("tiny").model.words)
    for name in ("sd15", "sd15_inpaint"):
        cfg = model_conf(name).model
        assert cfg._target_ == "mame_lightning.models.components.load_components"
        assert "stable-diffusion-v1-5/" in cfg.path
    assert model_conf("sd15_inpaint").model.inpaint_in_channels == 9


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MAME_TEST_FULL_SIZE"),
                    reason="writes ~4 GB and takes minutes on CPU; set MAME_TEST_FULL_SIZE=1 to run")
def test_sd15_arch_builds_and_loads_at_full_size(tmp_path):
    parts = comp.sd15_arch_components(tmp_path, words=["a", "mammogram"])
    assert sum(p.numel() for p in parts.unet.parameters()) == pytest.approx(859.52e6, rel=0.005)
    assert parts.text_encoder.get_input_embeddings().weight.shape == (49408, 768)
    assert parts.unet.config.sample_size == 64 and parts.vae.config.scaling_factor == 0.18215


def test_non_string_words_are_refused():
    with pytest.raises(TypeError, match="quote"):
        build_tokenizer(["a", False])


def test_vae_path_swaps_in_another_autoencoder(tmp_path, cache, tiny_cfg, tiny):
    other = copy.deepcopy(tiny.vae)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.5)
    other.save_pretrained(tmp_path / "vae")
    swapped = tiny_components(cache, **{**tiny_cfg, "vae_path": str(tmp_path / "vae")})
    for mine, theirs in zip(swapped.vae.parameters(), other.parameters()):
        assert torch.equal(mine, theirs)
    assert not torch.equal(swapped.vae.encoder.conv_in.weight, tiny.vae.encoder.conv_in.weight)
    assert not any(p.requires_grad for p in swapped.vae.parameters())
