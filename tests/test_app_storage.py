"""The app deletes and serves only folders it made, and removes its temporary folder on SIGTERM too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from helpers.app import free_port, start_app

from mame_lightning.app import handlers as h  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]
ATTRS = ("attributes", "siemens", "MLO", "high", "small", "")
SAMPLING = ("", 4.0, 2, 0, False, 1, "dpmsolver++", False)  # negative, guidance, steps, seed, random, n, ...
DAY = 86400


def aged(path: Path, days: float = 3) -> Path:
    past = time.time() - days * DAY
    os.utime(path, (past, past))
    return path


def served(url: str, path: Path) -> int:
    return httpx.get(f"{url.rstrip('/')}/gradio_api/file={path}", timeout=30).status_code


def test_an_output_dir_full_of_other_things_loses_nothing_and_serves_nothing(t2i_dir, tmp_path):
    home = tmp_path / "home"
    old_results = home / "generate-20230101-120000-0123abcd"  # even one named like a request folder
    (home / "results").mkdir(parents=True)
    old_results.mkdir()
    (old_results / "figure.png").write_bytes(b"mine")
    secret = home / "notes.txt"
    secret.write_text("private")
    for folder in (home / "results", old_results):
        aged(folder)
    running = start_app(text2image=t2i_dir, extra=[f"app.output_dir={home}", "app.keep_hours=1"])
    try:
        gallery, *_ = h.generate(running.context, *ATTRS, *SAMPLING)
        assert (home / "results").is_dir() and (old_results / "figure.png").read_bytes() == b"mine"
        assert secret.read_text() == "private"
        produced = Path(gallery[0][0])
        assert produced.is_relative_to(home / "mame_app")
        assert served(running.url, produced) == 200  # the app's own files are served ...
        assert served(running.url, secret) != 200  # ... nothing else under app.output_dir
        assert served(running.url, old_results / "figure.png") != 200

        own_old = aged(produced.parent)  # the app's own old request folder is pruned
        h.generate(running.context, *ATTRS, *SAMPLING)
        assert not own_old.exists() and (old_results / "figure.png").is_file()
    finally:
        running.close()
    assert (home / "results").is_dir() and secret.is_file()


def test_prune_needs_our_name_and_our_marker(tmp_path):
    from mame_lightning.app.storage import REQUEST_MARKER, app_root, new_request_dir, prune

    root, temporary = app_root(tmp_path / "out")
    assert root == (tmp_path / "out" / "mame_app").resolve() and not temporary
    ours = aged(new_request_dir(root, "generate"))
    forged = root / "generate-20230101-120000-deadbeef"  # our name, no marker
    forged.mkdir()
    aged(forged)
    (root / "linked-20230101-120000-deadbeef").symlink_to(tmp_path, target_is_directory=True)
    assert prune(root, 3600) == [ours]
    assert forged.is_dir() and tmp_path.is_dir() and not (forged / REQUEST_MARKER).exists()

    foreign = tmp_path / "theirs" / "mame_app"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="was not made by this app"):
        app_root(tmp_path / "theirs")


def test_sigterm_removes_the_temporary_output_folder(inpaint_dir, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "mame_lightning.app", f"model.inpaint={inpaint_dir}",
                             f"app.port={port}", "model.device=cpu"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("the app did not start")
        folders = list(tmp.glob("mame_app_*"))
        assert len(folders) == 1 and (folders[0] / "_example").is_dir()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert not folders[0].exists(), proc.stdout.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_signal_during_start_up_is_the_same_clean_stop(inpaint_dir, tmp_path, monkeypatch):
    """SIGTERM can land while gradio is still starting (its own readiness request), before its serving
    loop catches Ctrl+C: serve() still stops cleanly, temporary folder removed, no traceback."""
    import gradio

    from helpers.app import FAST
    from mame_lightning.app.server import load_config, serve

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)

    def interrupted_launch(self, *args, **kwargs):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(gradio.Blocks, "launch", interrupted_launch)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        running = serve(load_config([f"model.inpaint={inpaint_dir}", f"app.port={free_port()}", *FAST]), block=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert running.temporary and not any(folder.exists() for folder in running.temporary)
    assert not list(tmp_path.glob("mame_app_*"))
    with pytest.raises(KeyboardInterrupt):  # a caller that runs it in the background still hears it
        serve(load_config([f"model.inpaint={inpaint_dir}", f"app.port={free_port()}", *FAST]), block=False)
    assert not list(tmp_path.glob("mame_app_*"))
