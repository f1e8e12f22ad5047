"""The UI in a real browser: Playwright (from PyPI) driving Debian's /usr/bin/chromium, installed
by .ci/browser-deps (never `playwright install`, which downloads a browser). Screenshots go to
tests/artifacts/; with STYLELORA_UPDATE_DOCS=1 the Generate tab's also replaces docs/ui.png (the
README's picture), so an ordinary test run leaves the checkout clean."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_ui import launch, make_adapter, request

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing in CI: .ci/browser-deps should have installed it")
        pytest.skip(f"no {CHROMIUM}: run `bash .ci/browser-deps` (as root) for the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app_url(tiny_base, tmp_path_factory):
    """Its own app and folders: two random adapters, one small rendered style dataset. The
    embedded base when it is there (so docs/ui.png shows real drawings), else a random one."""
    from stylelora.base import EMBEDDED_DIR, load_base
    from stylelora.world.render import render_batch, styled_caption
    from ui.app import build_app

    root = tmp_path_factory.mktemp("ui-browser")
    base = None if (EMBEDDED_DIR / "model_index.json").is_file() else str(tiny_base)
    pipe = load_base(base)
    make_adapter(pipe, root / "adapters" / "dotty.safetensors", 2, triggers=["dotty"], strength=0.2)
    make_adapter(pipe, root / "adapters" / "inky.safetensors", 1, triggers=["inky"], strength=0.2)
    ds = root / "datasets" / "pastel"
    ds.mkdir(parents=True)
    for i, (scene, img) in enumerate(render_batch(8, 0, "pastel", "flat", 64), 1):
        img.save(ds / f"{i:04d}.png")
        (ds / f"{i:04d}.txt").write_text(styled_caption(scene, "pastel", "flat") + "\n")
    app = build_app(root / "adapters", base=base, datasets_dir=root / "datasets")
    yield app, launch(app)
    app.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(app_url[1])
    page.locator("#slot1").first.wait_for(state="visible")  # the load event listed the adapters
    yield page
    page.close()


# The settings JSON's text once the event is done (null while the outputs show a progress overlay).
SETTINGS_JS = """() => {
  const busy = [...document.querySelectorAll('#settings, #output-image')].some(e =>
    [...e.querySelectorAll('[data-testid=status-tracker]')].some(t => !t.classList.contains('hide')));
  const json = document.querySelector('#settings');
  const tracker = json.querySelector('[data-testid=status-tracker]');
  return busy ? null : json.innerText.replace(tracker ? tracker.innerText : '', '');
}"""


def generate(page) -> np.ndarray:
    """Click Generate, wait for the new settings (they include the time taken, so they always
    change), and return the displayed image's pixels as served to the browser."""
    from PIL import Image

    before = page.evaluate(SETTINGS_JS)
    page.locator("#generate").click()
    page.wait_for_function(f"b => {{ const s = ({SETTINGS_JS})(); return s !== null && s !== b; }}", arg=before)
    src = page.locator("#output-image img").first.get_attribute("src")
    body = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def set_slider(page, elem_id: str, value: float) -> None:
    """Drag-free but real: nudge the range input by keyboard (the user moving it), then type the
    exact value into the slider's number box."""
    page.locator(f"#{elem_id} input[type=range]").press("ArrowRight")
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_generate_with_sliders(page, app_url):
    ui = app_url[0].stylelora
    assert page.locator("#slot0").first.inner_text().count("dotty") and page.locator("#slot1").first.inner_text().count("inky")
    base = generate(page)
    assert base.shape == (64, 64, 3)

    page.locator("#slot1-on input").check()  # inky, sorted after dotty
    set_slider(page, "slot1-strength", 0)
    zero = generate(page)
    assert np.array_equal(zero, base), "strength 0 must render exactly the no-adapter image"

    set_slider(page, "slot1-strength", 1.5)
    styled = generate(page)
    assert not np.array_equal(styled, base)
    # the browser's image is the one the API gives for the same settings
    direct, _ = ui.generate(*request(adapters={"inky": 1.5}, steps=20))
    assert np.array_equal(styled, np.asarray(direct.convert("RGB")))

    page.locator("#slot1-strength").locator("xpath=ancestor::div[@id='slot1'][1]").locator("button", has_text="+ inky").click()
    page.wait_for_function("() => document.querySelector('#prompt textarea, #prompt input').value.includes('inky')")
    page.get_by_role("button", name="Strength sweep").click()
    page.locator("#sweep-grid img").wait_for()
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)
    if os.environ.get("STYLELORA_UPDATE_DOCS") == "1":
        shutil.copyfile(ARTIFACTS / "generate.png", ROOT / "docs" / "ui.png")


def test_train_tab_shows_progress_and_the_new_adapter(page, app_url):
    page.get_by_role("tab", name="Train").click()
    dataset = page.locator("#dataset input")
    dataset.fill("pastel")
    dataset.press("Enter")
    page.get_by_role("button", name="Load captions").click()
    page.get_by_text("0001.png").filter(visible=True).first.wait_for()
    page.locator("#train-name textarea, #train-name input").first.fill("browser-pastel")
    steps = page.locator("#train-steps input")
    steps.fill("20")
    steps.press("Tab")
    page.locator("#train-start").click()
    status = page.locator("#train-status")
    status.wait_for()
    page.wait_for_function("() => /step \\d+\\/20/.test(document.querySelector('#train-status').innerText)")
    page.screenshot(path=str(ARTIFACTS / "train-running.png"), full_page=True)
    # 50-100 s on the 2-core CI machine (four sample grids and the strength calibration): a wide margin
    page.wait_for_function("() => document.querySelector('#train-status').innerText.includes('done')",
                           timeout=300_000)
    assert "20/20" in status.inner_text()
    page.screenshot(path=str(ARTIFACTS / "train-done.png"), full_page=True)
    assert (app_url[0].stylelora.adapters_dir / "browser-pastel.safetensors").is_file()
    page.get_by_role("tab", name="Generate").click()
    page.locator("#slot0").first.get_by_text("browser-pastel").wait_for()  # listed without a restart


def test_adapters_tab_inspect_and_confirmed_delete(page, app_url):
    page.get_by_role("tab", name="Adapters").click()
    page.locator("#adapter-pick input").click()
    page.get_by_role("option", name="dotty").click()
    page.get_by_text("trigger_words").first.wait_for()
    delete = page.get_by_role("button", name="Delete")
    delete.click()  # not confirmed: refused, file kept
    page.get_by_text("tick the confirmation box").first.wait_for()
    assert (app_url[0].stylelora.adapters_dir / "dotty.safetensors").is_file()
    page.get_by_label("yes, delete the adapter picked above").check()
    delete.click()
    page.get_by_text("deleted dotty.safetensors").wait_for()
    assert not (app_url[0].stylelora.adapters_dir / "dotty.safetensors").exists()
    page.screenshot(path=str(ARTIFACTS / "adapters.png"), full_page=True)
    page.get_by_role("tab", name="Generate").click()
    from playwright.sync_api import expect

    expect(page.locator("[id^=slot] .label-text", has_text="dotty")).to_have_count(0)  # slot gone


@pytest.fixture(scope="module")
def xl_app_url(tiny_xl_base, tmp_path_factory):
    """The UI on an SDXL-architecture base: the embedded XL base when it is there, else a random one."""
    from stylelora.base import EMBEDDED_XL_DIR, load_base
    from ui.app import build_app

    root = tmp_path_factory.mktemp("ui-browser-xl")
    base = "embedded-xl" if (EMBEDDED_XL_DIR / "model_index.json").is_file() else str(tiny_xl_base)
    make_adapter(load_base(base), root / "adapters" / "dotty.safetensors", 2, triggers=["dotty"], strength=0.2)
    app = build_app(root / "adapters", base=base, datasets_dir=root / "datasets")
    yield app, launch(app)
    app.close()


def test_xl_base_generates_at_sdxl_sizes(browser, xl_app_url):
    """On an SDXL base the size control lists SDXL's resolutions (scaled to the base); a wide one
    gives a wide image, the same as the API's; an adapter at strength 1.5 changes it."""
    from ui.app import size_choices

    app, url = xl_app_url
    ui = app.stylelora
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("#slot0").first.wait_for(state="visible")
    wide = size_choices(ui.native)[1]  # 1152x896 at SDXL's scale
    page.get_by_label("size (W x H)").click()
    page.get_by_role("option", name=wide, exact=True).click()
    plain = generate(page)
    w, h = (int(v) for v in wide.split("x"))
    assert plain.shape == (h, w, 3) and w > h
    page.locator("#slot0-on input").check()
    set_slider(page, "slot0-strength", 1.5)
    styled = generate(page)
    assert not np.array_equal(styled, plain)
    direct, settings = ui.generate(*request(adapters={"dotty": 1.5}, steps=20, size=wide, slot_names=["dotty"]))
    assert settings["size"] == [w, h]
    assert np.array_equal(styled, np.asarray(direct.convert("RGB")))
    page.screenshot(path=str(ARTIFACTS / "generate-xl.png"), full_page=True)
    page.close()
