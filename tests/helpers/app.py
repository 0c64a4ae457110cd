"""Start the GUI in-process for the app tests: tiny models, 64 px, 2 sampling steps, a free port."""

from __future__ import annotations

import socket

from mame_lightning.app.server import RunningApp, load_config, serve

# Fast settings: the tiny model at 2 steps; limits small enough to test with small files.
FAST = ["model.device=cpu", "app.steps_range=[1,50]", "app.defaults.steps=2", "app.max_pixels=1000000",
        "app.max_images=3"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(*, text2image=None, inpaint=None, extra: list[str] | tuple[str, ...] = ()) -> RunningApp:
    """The app on a free 127.0.0.1 port, returning at once (the server runs in a thread)."""
    overrides = [f"app.port={free_port()}", *FAST, *extra]
    if text2image:
        overrides.append(f"model.text2image={text2image}")
    if inpaint:
        overrides.append(f"model.inpaint={inpaint}")
    return serve(load_config(overrides), block=False)
