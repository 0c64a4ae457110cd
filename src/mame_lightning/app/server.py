"""Start the GUI: load the models once, build the tabs, serve them behind a request queue.

Safe by default: bound to 127.0.0.1, no public share link, no analytics, optional username and
password (config or MAME_APP_USER / MAME_APP_PASSWORD). Model calls from all tabs share one
concurrency limit (`app.concurrency`) and a bounded queue (`app.max_queue`), so simultaneous users
wait their turn instead of running the GPU out of memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import mame_lightning.app  # noqa: F401 - analytics off before gradio is imported
from mame_lightning import CONF_DIR

# gradio, torch and diffusers are imported where they are used, so a bad command line fails fast.

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV = "MAME_APP_USER", "MAME_APP_PASSWORD"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """conf/app.yaml with command-line style overrides, without starting Hydra's job machinery."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="app", overrides=list(overrides))


def load_one(path, task: str, cfg: DictConfig):
    """The LoadedModel for one slot (None when not given), refused when it holds the other task's model."""
    if not path:
        return None
    from mame_lightning.pipelines.loading import load_model

    model = load_model(path, device=cfg.model.device, dtype=cfg.model.dtype, scheduler=cfg.model.scheduler)
    if model.task != task:
        other = "inpaint" if task == "text2image" else "text2image"
        raise ValueError(f"model.{task}={path} is a {model.task} model; pass it as model.{other}={path}")
    log.info("loaded %s model %s on %s (%s)", task, path, model.device, model.pipe.unet.dtype)
    return model


def load_models(cfg: DictConfig) -> tuple:
    """(text-to-image model or None, inpainting model or None); at least one is needed."""
    if not cfg.model.text2image and not cfg.model.inpaint:
        raise ValueError("no model given: start with model.text2image=EXPORT_DIR and/or model.inpaint=EXPORT_DIR "
                         "(folders written by `python -m mame_lightning.export` or a training run's export/)")
    return load_one(cfg.model.text2image, "text2image", cfg), load_one(cfg.model.inpaint, "inpaint", cfg)


def make_example(folder: Path, size: int, seed: int = 0) -> Path:
    """A phantom mammogram (as acquired: taller than wide, left breast) for the Inpaint tab."""
    import numpy as np

    from mame_lightning.data.synthetic.phantoms import PhantomSpec, render_phantom
    from mame_lightning.pipelines.marking import save_png

    spec = PhantomSpec(height=max(16, round(size * 1.25)), width=max(16, size), view="MLO", density="B", area="medium")
    phantom = render_phantom(spec, np.random.default_rng(seed))
    image = np.clip(np.rint(phantom.image * 255.0), 0, 255).astype(np.uint8)
    return save_png(image, folder / "example_phantom.png", {"task": "phantom", "view": "MLO", "seed": seed})


def output_root(cfg: DictConfig) -> tuple[Path, bool]:
    """The app's own folder for request files (inside app.output_dir), and whether it is temporary."""
    from mame_lightning.app.storage import app_root

    return app_root(cfg.app.output_dir)


def make_context(cfg: DictConfig, root: Path):
    """The AppContext: models loaded once, limits, and the example phantom."""
    text2image, inpainter = load_models(cfg)
    from mame_lightning.app.handlers import AppContext, AppLimits

    limits = AppLimits(max_pixels=int(cfg.app.max_pixels), max_images=int(cfg.app.max_images),
                       batch_size=int(cfg.app.batch_size), keep_hours=float(cfg.app.keep_hours))
    ctx = AppContext(text2image, inpainter, root, limits)
    if cfg.app.example and inpainter is not None:
        ctx.example = make_example(root / "_example", inpainter.size)
    return ctx


def ui_defaults(cfg: DictConfig):
    from mame_lightning.app.ui import UiDefaults

    d = cfg.app.defaults
    return UiDefaults(
        title=str(cfg.app.title), guidance=float(d.guidance), guidance_range=tuple(float(v) for v in cfg.app.guidance_range),
        steps=int(d.steps), steps_range=tuple(int(v) for v in cfg.app.steps_range), seed=int(d.seed), n=int(d.n),
        negative_prompt=str(d.negative_prompt or ""), scheduler=str(cfg.model.scheduler),
        cache_hours=float(cfg.app.keep_hours),
    )


def auth_from(cfg: DictConfig, environ=os.environ) -> tuple[str, str] | None:
    """(username, password) from the config or the environment; None when neither is set."""
    user = cfg.app.username or environ.get(USER_ENV)
    password = cfg.app.password or environ.get(PASSWORD_ENV)
    if bool(user) != bool(password):
        raise ValueError(f"set both a username and a password (app.username/app.password or {USER_ENV}/"
                         f"{PASSWORD_ENV}), or neither")
    return (str(user), str(password)) if user else None


@dataclass
class RunningApp:
    """A launched app: its Blocks, context and local URL; `close()` stops it and removes temp files."""

    blocks: object
    context: object  # handlers.AppContext
    url: str
    auth: tuple[str, str] | None = None
    temporary: list[Path] = field(default_factory=list)

    def close(self) -> None:
        self.blocks.close()
        for folder in self.temporary:
            shutil.rmtree(folder, ignore_errors=True)


def stop_on_sigterm() -> None:
    """SIGTERM (kill, docker stop, systemd) ends the app as Ctrl+C does, so its temporary folder goes too."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def serve(cfg: DictConfig, *, block: bool = True) -> RunningApp:
    """Load, build and launch; with block=False return at once (tests, notebooks)."""
    if block:
        stop_on_sigterm()
    auth = auth_from(cfg)
    host = str(cfg.app.host)
    if host not in LOOPBACK and auth is None:
        log.warning("serving on %s without a username/password: anyone on the network can use the app", host)
    root, temporary = output_root(cfg)
    try:
        ctx = make_context(cfg, root)
        from mame_lightning.app.ui import build_ui

        demo = build_ui(ctx, ui_defaults(cfg))
    except BaseException:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        raise
    demo.queue(default_concurrency_limit=int(cfg.app.concurrency), max_size=int(cfg.app.max_queue))
    running = RunningApp(demo, ctx, "", auth, [root] if temporary else [])
    try:
        demo.launch(
            server_name=host, server_port=None if cfg.app.port is None else int(cfg.app.port),
            share=bool(cfg.app.share), auth=auth, auth_message="MAM-E synthetic mammography" if auth else None,
            prevent_thread_lock=not block, show_error=True, ssr_mode=False, mcp_server=False, pwa=False,
            allowed_paths=[str(root)], max_file_size=f"{int(cfg.app.max_upload_mb)}mb", inbrowser=False,
        )
        running.url = demo.local_url or f"http://{host}:{cfg.app.port}/"
    except KeyboardInterrupt:
        running.close()
        if not block:
            raise
        return running  # Ctrl+C / SIGTERM before gradio reached its serving loop: the same clean stop
    except BaseException:
        running.close()
        raise
    if block:  # launch returned: the server was stopped (Ctrl+C or SIGTERM)
        running.close()
    return running


# Command-line and model-folder problems (ModelNotFoundError is an OSError): one line, no traceback.
USER_ERRORS = (ValueError, OSError)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="app")
def main(cfg: DictConfig) -> None:
    log.info("app settings:\n%s", OmegaConf.to_yaml({"model": cfg.model, "app": {
        k: ("***" if k == "password" and v else v) for k, v in cfg.app.items()}}))
    try:
        serve(cfg, block=True)
    except USER_ERRORS as exc:
        raise SystemExit(f"error: {exc}") from exc


def cli() -> None:
    main()


if __name__ == "__main__":
    sys.exit(cli())
