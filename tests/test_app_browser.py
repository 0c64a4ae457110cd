"""The GUI in a real browser: Debian's chromium driven by Playwright against the app on 127.0.0.1.

Playwright's own browser download needs the internet, so the system chromium is used; where it is
missing or cannot start, these tests skip and say why. Screenshots go to test-artifacts/ and are
copied to docs/images/ for the README when missing there or when MAME_DOC_SCREENSHOTS=1 (so a
plain test run leaves the committed images alone).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from helpers.app import start_app

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
DOC_IMAGES = ROOT / "docs" / "images"
MAX_DOC_BYTES = 300_000
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000
PROMPT = "a siemens mammogram in MLO view with high density and small area"


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def app(t2i_dir, inpaint_dir):
    running = start_app(text2image=t2i_dir, inpaint=inpaint_dir)
    yield running
    running.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A fresh chromium profile; requests that would leave 127.0.0.1 are blocked and recorded."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium not found: install Debian's chromium (apt-get install chromium) to run browser tests")
    playwright = sync_api.sync_playwright().start()
    try:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=executable, args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1200, "height": 900},
        )
    except Exception as exc:  # noqa: BLE001 - any start failure means no browser here
        playwright.stop()
        pytest.skip(f"chromium at {executable} could not start: {str(exc).splitlines()[0]}")
    context.outside = []

    def local_only(route):
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "data:", "blob:")):
            return route.continue_()
        context.outside.append(url)
        return route.abort()

    context.route("**/*", local_only)
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()
    playwright.stop()


@pytest.fixture
def page(browser, app):
    page = browser.new_page()
    page.goto(app.url)
    page.wait_for_selector("#generate-button")
    yield page
    page.close()
    assert browser.outside == [], f"the page tried to reach {browser.outside}"  # no outbound connection


def keep_screenshot(page, name: str) -> Path:
    """test-artifacts/<name>.png; docs/images/<name>.png as a small palette PNG when due."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    small = ARTIFACTS / f"{name}.small.png"
    with Image.open(shot) as img:
        img.convert("RGB").quantize(colors=128).save(small, optimize=True)
    assert small.stat().st_size < MAX_DOC_BYTES, f"{small} is {small.stat().st_size} bytes"
    doc = DOC_IMAGES / f"{name}.png"
    if os.environ.get("MAME_DOC_SCREENSHOTS") == "1" or not doc.exists():
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(small, doc)
    return shot


def choose(page, label: str, value: str) -> None:
    """Pick a dropdown value the way a user does: type it and take the matching option."""
    box = page.get_by_label(label, exact=True)
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).click()


def set_number(page, label: str, value) -> None:
    field = page.get_by_label(label, exact=True).first
    field.fill(str(value))
    field.press("Enter")


def painted_pixels(page, editor_id: str) -> int:
    """How many strongly red pixels the editor shows (the brush colour is #ff3030)."""
    import io

    shot = np.asarray(Image.open(io.BytesIO(page.locator(f"#{editor_id}").screenshot())).convert("RGB")).astype(int)
    return int(((shot[..., 0] > 200) & (shot[..., 1] < 110) & (shot[..., 2] < 110)).sum())


def brush_stroke(page, editor_id: str, attempts: int = 20) -> None:
    """Mouse down, a short drag across the middle of the canvas (where the image is), mouse up.

    The canvas takes a moment to accept strokes after its image appears; a stroke that left no
    paint is drawn again.
    """
    canvas = page.locator(f"#{editor_id} canvas").first
    for _ in range(attempts):
        box = canvas.bounding_box()
        x, y = box["x"] + box["width"] / 2 - 30, box["y"] + box["height"] / 2 - 10
        page.mouse.move(x, y)
        page.mouse.down()
        for i in range(1, 5):  # few points: every move repaints the (software-rendered) canvas
            page.mouse.move(x + 15 * i, y + 5 * i)
        page.mouse.up()
        page.mouse.move(1, 1)  # the brush cursor is a red circle: take it off the canvas
        if painted_pixels(page, editor_id) > 300:
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"no brush paint appeared on #{editor_id} after {attempts} strokes")


def wait_for_background(page, editor_id: str) -> None:
    """The editor drops its "Upload an image" placeholder once it shows a background."""
    page.wait_for_function(
        "id => { const e = document.getElementById(id); return e && !e.innerText.includes('Upload an image'); }",
        arg=editor_id)


def shown_pixels(page, selector: str) -> np.ndarray:
    """The image an <img> displays, fetched through the page (same origin) and decoded."""
    import io

    data = page.evaluate("""async sel => {
        const r = await fetch(document.querySelector(sel).src);
        return Array.from(new Uint8Array(await r.arrayBuffer()));
    }""", selector)
    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("L"))


def test_generate_form_shows_the_prompt_and_an_image(page):
    for label, value in (("vendor", "siemens"), ("view", "MLO"), ("density", "high"), ("area", "small")):
        choose(page, label, value)
    page.wait_for_function("p => [...document.querySelectorAll('textarea')].some(t => t.value === p)", arg=PROMPT)
    set_number(page, "Seed", 3)
    page.locator("#generate-button").click()
    page.wait_for_selector("#generate-gallery img")
    image = shown_pixels(page, "#generate-gallery img")
    assert image.shape == (64, 64) and image.std() > 0
    keep_screenshot(page, "app_generate")


def test_brush_stroke_on_the_canvas_inpaints(page):
    page.get_by_role("tab", name="Inpaint lesion").click()
    page.get_by_role("button", name="Load the example phantom").click()
    wait_for_background(page, "inpaint-editor")
    brush_stroke(page, "inpaint-editor")
    page.locator("#inpaint-button").click()
    page.wait_for_selector("#inpaint-result img")
    page.get_by_text("inpaint_seed0_mask").wait_for()  # file names show without their suffix
    result = shown_pixels(page, "#inpaint-result img")
    assert result.shape[0] >= 4 * 64 and result.std() > 0
    keep_screenshot(page, "app_inpaint")


def test_full_pipeline_generates_paints_and_offers_the_annotation(page):
    page.get_by_role("tab", name="Full pipeline").click()
    page.locator("#full-generate-button").click()
    wait_for_background(page, "full-editor")
    brush_stroke(page, "full-editor")
    page.locator("#full-inpaint-button").click()
    page.wait_for_selector("#full-result img")
    page.get_by_text("_finding_annotations").wait_for()
    assert page.get_by_text("['Mass']").count() >= 1  # the annotation row is shown
    keep_screenshot(page, "app_full")
