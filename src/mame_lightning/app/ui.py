"""The GUI layout: three tabs (Generate, Inpaint lesion, Full pipeline) wired to `handlers`.

Only layout and wiring live here. Every heavy action shares one concurrency group ("models"), so
`app.concurrency` bounds how many run at once whatever tab they come from; prompt previews are
cheap and never wait behind them. Each action has a named API endpoint for scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import gradio as gr

from mame_lightning.app import handlers as h
from mame_lightning.pipelines.loading import SCHEDULERS

HEAVY = {"concurrency_id": "models"}  # limit set on the queue (server.py)
LIGHT = {"concurrency_limit": None, "show_progress": "hidden"}
NOTICE = "This tool makes synthetic mammograms for research. Every download is marked synthetic " \
         "(PNG text chunks; DICOM copies carry no patient identity)."


@dataclass
class UiDefaults:
    """Form defaults and slider ranges (conf/app.yaml, app.defaults / app.*_range)."""

    title: str = "MAM-E synthetic mammography"
    guidance: float = 4.0
    guidance_range: tuple[float, float] = (0.0, 20.0)
    steps: int = 24
    steps_range: tuple[int, int] = (10, 50)
    seed: int = 0
    n: int = 1
    negative_prompt: str = ""
    scheduler: str = "dpmsolver++"
    cache_hours: float = 24.0  # gradio's copies of uploads and results are deleted after this
    lesion_categories: list[str] = field(default_factory=lambda: list(h.FINDING_CATEGORIES))


@dataclass
class PromptControls:
    source: gr.Radio
    attributes: list[gr.Dropdown]
    free_prompt: gr.Textbox
    negative: gr.Textbox
    composed: gr.Textbox

    @property
    def inputs(self) -> list:
        return [self.source, *self.attributes, self.free_prompt]


@dataclass
class SamplingControls:
    guidance: gr.Slider
    steps: gr.Slider
    seed: gr.Number
    random_seed: gr.Checkbox
    scheduler: gr.Dropdown


def prompt_controls(ctx: h.AppContext, defaults: UiDefaults) -> PromptControls:
    choices = h.attribute_choices(ctx.text2image)
    source = gr.Radio(list(h.PROMPT_SOURCES), value="attributes", label="Prompt from")
    with gr.Row():
        attributes = [gr.Dropdown(choices[name], value=h.ANY, label=name, allow_custom_value=True, min_width=100)
                      for name in ("vendor", "view", "density", "area")]
    free_prompt = gr.Textbox("", label="Free-text prompt", placeholder="used when 'Prompt from' is 'free text'", lines=1)
    negative = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt, placeholder="e.g. white background")
    composed = gr.Textbox(label="Prompt sent to the model", interactive=False)
    return PromptControls(source, attributes, free_prompt, negative, composed)


def sampling_controls(defaults: UiDefaults) -> SamplingControls:
    with gr.Row():
        guidance = gr.Slider(*defaults.guidance_range, value=defaults.guidance, step=0.5, label="Guidance")
        steps = gr.Slider(*defaults.steps_range, value=defaults.steps, step=1, label="Steps")
    with gr.Row():
        seed = gr.Number(value=defaults.seed, precision=0, label="Seed", minimum=0)
        random_seed = gr.Checkbox(value=False, label="Random seed")
        scheduler = gr.Dropdown(list(SCHEDULERS), value=defaults.scheduler, label="Scheduler")
    return SamplingControls(guidance, steps, seed, random_seed, scheduler)


def lesion_editor(ctx: h.AppContext, label: str, elem_id: str) -> gr.ImageEditor:
    """A brush-only canvas; the brush is about a lesion wide (1/12 of the model's image side)."""
    side = (ctx.inpainter or ctx.text2image).size
    return gr.ImageEditor(
        label=label, type="numpy", image_mode="RGBA", format="png", sources=("upload",), layers=False,
        transforms=(), brush=gr.Brush(colors=["#ff3030"], color_mode="fixed", default_size=max(2, side // 12)),
        eraser=gr.Eraser(default_size=max(2, side // 12)), canvas_size=(side, side), elem_id=elem_id,
    )


def missing(ctx: h.AppContext, *tasks: str) -> list[str]:
    return [h.MISSING_MODEL[t] for t in tasks if (ctx.text2image if t == "text2image" else ctx.inpainter) is None]


def notice(messages: list[str]) -> None:
    if messages:
        gr.Markdown("\n\n".join(f"**{m}**" for m in messages), elem_classes=["mame-missing"])


def compose_for_preview(ctx: h.AppContext, source, vendor, view, density, area, free_prompt) -> str:
    """The prompt as the user edits the form; an empty free-text box previews as nothing."""
    if source == "free text" and not str(free_prompt or "").strip():
        return ""
    return h.compose_prompt(ctx, source, vendor, view, density, area, free_prompt)


def wire_prompt_preview(ctx: h.AppContext, controls: PromptControls, api_name: str | None) -> None:
    triggers = [controls.source.change, *(d.change for d in controls.attributes), controls.free_prompt.blur,
                controls.free_prompt.submit]
    visibility = "public" if api_name else "private"
    gr.on(triggers, partial(compose_for_preview, ctx), controls.inputs, controls.composed, api_name=api_name,
          api_visibility=visibility, **LIGHT)


def generate_tab(ctx: h.AppContext, defaults: UiDefaults):
    notice(missing(ctx, "text2image"))
    with gr.Row():
        with gr.Column():
            prompt = prompt_controls(ctx, defaults)
            sampling = sampling_controls(defaults)
            with gr.Row():
                n = gr.Slider(1, ctx.limits.max_images, value=defaults.n, step=1, label="Number of images")
                dicom = gr.Checkbox(False, label="Also DICOM")
            button = gr.Button("Generate", variant="primary", interactive=ctx.text2image is not None,
                               elem_id="generate-button")
        with gr.Column():
            gallery = gr.Gallery(label="Generated", columns=2, object_fit="contain", elem_id="generate-gallery",
                                 type="filepath")
            files = gr.File(label="Downloads (marked synthetic)", file_count="multiple", interactive=False)
            send = gr.Button("Send selected image to inpainting", interactive=ctx.inpainter is not None)
    wire_prompt_preview(ctx, prompt, "compose_prompt")
    selected = gr.State(0)
    button.click(partial(h.generate, ctx), [*prompt.inputs, prompt.negative, sampling.guidance, sampling.steps,
                                            sampling.seed, sampling.random_seed, n, sampling.scheduler, dicom],
                 [gallery, prompt.composed, sampling.seed, files], api_name="generate", **HEAVY
                 ).then(lambda: 0, None, selected, api_visibility="private", **LIGHT)
    gallery.select(select_index, None, selected, api_visibility="private", **LIGHT)
    return send, gallery, selected, prompt


def select_index(evt: gr.SelectData) -> int:
    return int(evt.index)


def inpaint_tab(ctx: h.AppContext, defaults: UiDefaults):
    notice(missing(ctx, "inpaint"))
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Mammogram to inpaint (PNG or DICOM)", type="filepath", elem_id="inpaint-upload")
            example = gr.Button("Load the example phantom", size="sm", interactive=ctx.example is not None)
            info = gr.Markdown("", label="Input")
            editor = lesion_editor(ctx, "Brush the lesion region", "inpaint-editor")
            box = gr.Textbox("", label="Or type a box x0,y0,x1,y1 (pixels of the uploaded image)", placeholder="20,20,36,36")
            prompt = gr.Textbox(label="Lesion prompt", value=h.default_lesion_prompt(ctx.inpainter))
            negative = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt)
            sampling = sampling_controls(defaults)
            dicom = gr.Checkbox(False, label="Also DICOM")
            button = gr.Button("Inpaint", variant="primary", interactive=ctx.inpainter is not None,
                               elem_id="inpaint-button")
        with gr.Column():
            with gr.Row():
                before = gr.Image(label="Input and region", type="numpy", format="png", interactive=False)
                after = gr.Image(label="Result", type="numpy", format="png", interactive=False, elem_id="inpaint-result")
            files = gr.File(label="Downloads (marked synthetic)", file_count="multiple", interactive=False)
    upload.upload(partial(h.load_image, ctx), upload, [editor, info], api_name="load_image", **HEAVY)
    example.click(partial(h.load_example, ctx), None, [upload, editor, info], api_name="load_example", **HEAVY)
    button.click(partial(h.inpaint_lesion, ctx), [upload, editor, box, prompt, negative, sampling.guidance,
                                                   sampling.steps, sampling.seed, sampling.random_seed,
                                                   sampling.scheduler, dicom],
                 [before, after, files, sampling.seed], api_name="inpaint", **HEAVY)
    return upload, editor, info


def full_tab(ctx: h.AppContext, defaults: UiDefaults) -> PromptControls:
    notice(missing(ctx, "text2image", "inpaint"))
    ready = ctx.text2image is not None and ctx.inpainter is not None
    state = gr.State(None)
    with gr.Row():
        with gr.Column():
            prompt = prompt_controls(ctx, defaults)
            sampling = sampling_controls(defaults)
            step1 = gr.Button("1. Generate a healthy mammogram", variant="primary", interactive=ready,
                              elem_id="full-generate-button")
            editor = lesion_editor(ctx, "2. Brush the lesion region on it", "full-editor")
            box = gr.Textbox("", label="Or type a box x0,y0,x1,y1", placeholder="20,20,36,36")
            lesion_prompt = gr.Textbox(label="Lesion prompt", value=h.default_lesion_prompt(ctx.inpainter))
            with gr.Row():
                category = gr.Dropdown(defaults.lesion_categories, value=defaults.lesion_categories[0],
                                       label="Finding category", allow_custom_value=True)
                birads = gr.Dropdown(h.FINDING_BIRADS, value="", label="Finding BI-RADS", allow_custom_value=True)
                dicom = gr.Checkbox(False, label="Also DICOM")
            step2 = gr.Button("3. Paint the lesion", variant="primary", interactive=ready, elem_id="full-inpaint-button")
        with gr.Column():
            result = gr.Image(label="Result", type="numpy", format="png", interactive=False, elem_id="full-result")
            files = gr.File(label="Image, mask and annotation (CSV)", file_count="multiple", interactive=False)
            table = gr.Dataframe(label="VinDr-style finding annotation", interactive=False)
    wire_prompt_preview(ctx, prompt, None)
    step1.click(partial(h.full_generate, ctx), [*prompt.inputs, prompt.negative, sampling.guidance, sampling.steps,
                                                sampling.seed, sampling.random_seed, sampling.scheduler],
                [editor, prompt.composed, sampling.seed, state], api_name="full_generate", **HEAVY)
    step2.click(partial(h.full_inpaint, ctx), [state, editor, box, lesion_prompt, category, birads, prompt.negative,
                                               sampling.guidance, sampling.steps, sampling.scheduler, dicom],
                [result, files, table], api_name="full_inpaint", **HEAVY)
    return prompt


def build_ui(ctx: h.AppContext, defaults: UiDefaults | None = None) -> gr.Blocks:
    """The whole app as a `gr.Blocks` (not launched)."""
    defaults = defaults or UiDefaults()
    age = int(defaults.cache_hours * 3600)
    cleanup = (min(age, 3600), age) if age > 0 else None  # keep_hours <= 0: keep everything
    with gr.Blocks(title=defaults.title, analytics_enabled=False, delete_cache=cleanup) as demo:
        gr.Markdown(f"## {defaults.title}\n{NOTICE}")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                send, gallery, selected, prompt = generate_tab(ctx, defaults)
            with gr.Tab("Inpaint lesion", id="inpaint"):
                upload, editor, info = inpaint_tab(ctx, defaults)
            with gr.Tab("Full pipeline", id="full"):
                full_prompt = full_tab(ctx, defaults)
        send.click(partial(h.send_to_inpaint, ctx), [gallery, selected], [upload, editor, info],
                   api_name="send_to_inpaint", **LIGHT).then(lambda: gr.Tabs(selected="inpaint"), None, tabs,
                                                             api_visibility="private", **LIGHT)
        if ctx.text2image is not None:
            for controls in (prompt, full_prompt):
                demo.load(partial(compose_for_preview, ctx), controls.inputs, controls.composed,
                          api_visibility="private", **LIGHT)
    return demo


__all__ = ["UiDefaults", "build_ui", "compose_for_preview"]
