"""Generation from trained models: loading, prompts, text-to-image, inpainting, the full lesion flow.

    from mame_lightning.pipelines import load_model, build_prompt, text2image, GenerationSettings
    model = load_model("runs/x/export")
    prompt = build_prompt(model.metadata, attributes={"view": "MLO", "area": "small"})
    images = text2image(model, prompt, n=4, settings=GenerationSettings(seed=0))

Every output written through `marking` / `outputs` is marked synthetic.
"""

from mame_lightning.pipelines.generation import Generated, GenerationSettings, inpaint, text2image
from mame_lightning.pipelines.loading import SCHEDULERS, LoadedModel, ModelNotFoundError, load_model
from mame_lightning.pipelines.prompting import UnknownAttributeError, build_prompt

__all__ = [
    "Generated", "GenerationSettings", "inpaint", "text2image", "SCHEDULERS", "LoadedModel", "ModelNotFoundError",
    "load_model", "UnknownAttributeError", "build_prompt",
]
