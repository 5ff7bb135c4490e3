"""`noisecraft ui` in a real browser: Debian's chromium, headless, driven by Python Playwright through
executable_path (Playwright's own browser download does not work offline). Loads the page, generates on a tiny model
and sees the live preview and the final image, cancels a run, paints a mask and inpaints, and checks that no request
left 127.0.0.1 (no web fonts, no CDN, no telemetry), drops a noisecraft PNG onto the gallery (its settings come back)
and opens the Train tab. Screenshots go to the folder the test prints (or to
$NOISECRAFT_UI_SCREENSHOTS)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")

from test_guidance import write_run
from test_ui import free_port

from noisecraft.commands.ui import create, launch
from noisecraft.io.png_params import read_png_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("no chromium here (apt-get install chromium chromium-driver); the browser test needs it",
                allow_module_level=True)

TIMEOUT = 60_000    # ms: the CPU may be shared


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    write_run(base / "models" / "digits", num_classes=10)
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[16:48, 24:40] = 255
    Image.fromarray(picture).save(base / "digit.png")
    outputs = base / "outputs"
    demo, _ = create([str(base / "models")], outputs=outputs, announce=False)
    port = free_port()
    launch(demo, port=port, outputs=outputs, block=False)
    shots = Path(os.environ.get("NOISECRAFT_UI_SCREENSHOTS") or base / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {shots}")
    yield {"url": f"http://127.0.0.1:{port}/", "base": base, "outputs": outputs, "shots": shots, "port": port}
    demo.close()


@pytest.fixture(scope="module")
def browser_page(site):
    requests = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.on("request", lambda r: requests.append(r.url))
        page.set_default_timeout(TIMEOUT)
        page.goto(site["url"])
        page.wait_for_selector("#generate")
        yield page, requests
        browser.close()


def status(page) -> str:
    return page.inner_text("#status")


def wait_status(page, text: str):
    page.wait_for_function(f"document.querySelector('#status').innerText.includes({text!r})", timeout=TIMEOUT)


def set_number(page, elem_id: str, value):
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def choose_model(page, site):
    """The first model of the list is loaded when the page opens; picking it again from the list changes nothing."""
    wait_status(page, "loaded digits")
    page.locator("#model input").first.click()
    page.locator("ul[role=listbox] li", has_text="digits").first.click()


def test_page_generate_preview_cancel_and_inpaint(site, browser_page):
    page, requests = browser_page
    shots = site["shots"]
    choose_model(page, site)
    page.screenshot(path=shots / "1-loaded.png", full_page=True)

    # A long run: the live preview appears while it runs, then Cancel stops it.
    set_number(page, "steps", 1000)
    set_number(page, "batch", 16)               # a tiny model: 16 pictures a step, so the run outlasts the clicks
    page.click("#generate")
    page.wait_for_selector("#preview img", timeout=TIMEOUT)
    wait_status(page, "step ")
    page.screenshot(path=shots / "2-running-preview.png", full_page=True)
    page.click("#cancel")
    wait_status(page, "cancelled after step")
    page.screenshot(path=shots / "3-cancelled.png", full_page=True)

    # A short run to the end: the final picture lands in the gallery.
    set_number(page, "steps", 30)
    set_number(page, "batch", 1)
    page.click("#generate")
    wait_status(page, "done:")
    page.wait_for_selector("#gallery img")
    page.screenshot(path=shots / "4-done-gallery.png", full_page=True)
    assert page.locator("#gallery img").count() >= 1

    # "Send to Edit" from the gallery: the picture lands in the editor of the Edit tab.
    page.locator("#gallery img").first.click()
    page.wait_for_timeout(500)
    page.click("#send")
    wait_status(page, "sent to Edit")
    page.wait_for_function("!document.querySelector('#editor').innerText.includes('Upload an image')",
                           timeout=TIMEOUT)
    page.screenshot(path=shots / "4b-sent-to-edit.png", full_page=True)
    previous = status(page)
    page.click("#edit")
    page.wait_for_function("([old]) => { const t = document.querySelector('#status').innerText; "
                           "return t !== old && (t.includes('done:') || t.includes('⚠')); }", arg=[previous],
                           timeout=TIMEOUT)
    assert "done:" in status(page), status(page)           # img2img of the picture sent from the gallery
    page.screenshot(path=shots / "4c-img2img-of-sent.png", full_page=True)

    # Edit: upload a picture, paint a mask on the right half, inpaint.
    page.get_by_role("tab", name="Edit").click()
    page.locator("#editor").wait_for(state="visible")
    for _ in range(3):                   # the editor may still be mounting: upload until its placeholder goes
        page.locator("#editor input[type=file]").first.set_input_files(str(site["base"] / "digit.png"))
        try:
            page.wait_for_function("!document.querySelector('#editor').innerText.includes('Upload an image')",
                                   timeout=10_000)
            break
        except playwright.TimeoutError:
            continue
    canvas = page.locator("#editor canvas").first
    canvas.wait_for()
    page.wait_for_timeout(2000)          # the editor draws the upload on its canvas (no server round trip to wait on)
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    for k in range(12):
        page.mouse.move(box["x"] + box["width"] * (0.55 + 0.03 * (k % 2)), box["y"] + box["height"] * (0.2 + 0.05 * k),
                        steps=4)
    page.mouse.up()
    page.get_by_label("inpaint").check()
    page.screenshot(path=shots / "5-mask-painted.png", full_page=True)
    page.wait_for_timeout(1000)
    before, previous = len(list(site["outputs"].glob("*.png"))), status(page)
    page.click("#edit")
    page.wait_for_function("([old]) => { const t = document.querySelector('#status').innerText; "
                           "return t !== old && (t.includes('done:') || t.includes('⚠')); }", arg=[previous],
                           timeout=TIMEOUT)
    page.screenshot(path=shots / "6-inpainted.png", full_page=True)
    assert "done:" in status(page), status(page)
    assert len(list(site["outputs"].glob("*.png"))) == before + 1

    # Watch and learn: the forward process of a picture, with the slider over t moved.
    page.get_by_role("tab", name="Watch and learn").click()
    slider = page.locator("#learn_t input[type=range]").first
    slider.wait_for()
    slider.fill("600")
    page.wait_for_function("document.querySelector('#learn_numbers').innerText.includes('t = 600')", timeout=TIMEOUT)
    page.wait_for_selector("#learn_xt img")
    page.screenshot(path=shots / "7-forward-process.png", full_page=True)

    # Drop a noisecraft PNG onto the gallery: every setting it carries comes back into the Create form.
    page.get_by_role("tab", name="Create").click()
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gallery").wait_for(state="visible")
    set_number(page, "steps", 3)
    set_number(page, "seed", 99)
    dropped = min(p for p in site["outputs"].glob("*.png"))              # the 30-step run's picture
    params = read_png_params(dropped)
    previous = status(page)
    data = list(dropped.read_bytes())
    transfer = page.evaluate_handle("([bytes, name]) => { const dt = new DataTransfer(); "
                                    "dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/png'})); "
                                    "return dt; }", [data, dropped.name])
    page.dispatch_event("#gallery", "dragover", {"dataTransfer": transfer})
    page.dispatch_event("#gallery", "drop", {"dataTransfer": transfer})
    page.wait_for_function("([old]) => { const t = document.querySelector('#status').innerText; "
                           "return t !== old && (t.includes('restored') || t.includes('⚠')); }", arg=[previous],
                           timeout=TIMEOUT)
    assert "settings restored" in status(page), status(page)
    page.wait_for_function(f"document.querySelector('#steps input').value == '{params['steps']}'", timeout=TIMEOUT)
    seed = int(params["seed"]) + int(params.get("index") or 0)
    assert page.locator("#seed input").first.input_value() == str(seed)
    page.screenshot(path=shots / "8-png-dropped-settings-restored.png", full_page=True)

    # Interpolate: a strip from the seed to seed B, shown as one picture.
    page.get_by_role("tab", name="Interpolate").click()
    page.locator("#interpolate").wait_for(state="visible")
    set_number(page, "steps", 5)
    set_number(page, "seed", 3)
    previous = status(page)
    page.click("#interpolate")
    page.wait_for_function("([old]) => { const t = document.querySelector('#status').innerText; "
                           "return t !== old && (t.includes('pictures from seed') || t.includes('⚠')); }",
                           arg=[previous], timeout=TIMEOUT)
    assert "6 pictures from seed 3 to seed 1" in status(page), status(page)
    page.wait_for_selector("#strip img")
    page.screenshot(path=shots / "8b-interpolation-strip.png", full_page=True)

    # Train: the tab renders with its dataset, model kind, minutes and the start button.
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-start").wait_for(state="visible")
    assert page.locator("#train-dataset").is_visible() and page.locator("#train-minutes").is_visible()
    page.screenshot(path=shots / "9-train-tab.png", full_page=True)

    # Nothing left the machine: every request went to the test's own server.
    local = f"http://127.0.0.1:{site['port']}/"
    outside = sorted({u for u in requests if not (u.startswith((local, "data:", "blob:")))})
    assert not outside, outside
