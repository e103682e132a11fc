"""The Space end to end in headless Chromium (Debian's `chromium` driven by Python playwright).

Loads the page, uploads an example, presses the button, waits for the verdict and the heat maps, and
saves a full-page screenshot to `test-artifacts/space_screenshot.png` (copied to
`docs/images/space_screenshot.png` when `LADMIM_UPDATE_SCREENSHOT=1`). The page must not fetch
anything from outside the machine.

By default the app serves a tiny random model, so the pictures show layout, not meaning; for the
documentation screenshot point `LADMIM_SCREENSHOT_MODEL` at a trained model, e.g.
`LADMIM_UPDATE_SCREENSHOT=1 LADMIM_SCREENSHOT_MODEL=outputs/synthloco/model pytest tests/test_space_browser.py`.

Needs `apt-get install chromium` and `pip install playwright` (never `playwright install`: its
browser download is not reachable here, the system browser is used instead).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

from conftest import tiny_config

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "test-artifacts" / "space_screenshot.png"
DOCS_IMAGE = ROOT / "docs" / "images" / "space_screenshot.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("gradio")

from test_space_app import EXAMPLES, free_port, load_app_module  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ladmim_hf import LadmimForAnomalyDetection, LadmimImageProcessor

    model_dir = os.environ.get("LADMIM_SCREENSHOT_MODEL")
    if not model_dir:
        model_dir = tmp_path_factory.mktemp("browser") / "model"
        torch.manual_seed(0)
        model = LadmimForAnomalyDetection(tiny_config())
        calibration = {"logical_mean": 3.0, "logical_std": 0.5, "structural_mean": 80.0, "structural_std": 5.0,
                       "threshold": 3.0}
        model.config.calibration = {name: dict(calibration) for name in model.categories}
        model.save_pretrained(model_dir)
        LadmimImageProcessor(size=64).save_pretrained(model_dir)
    app = load_app_module()
    demo = app.build_demo(str(model_dir))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **app.launch_kwargs())
    categories = app.model_categories(demo.ladmim_model)
    try:
        yield url, categories
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except sync_api.Error as error:  # e.g. a chromium package that cannot start here
            pytest.skip(f"cannot start {CHROMIUM} through playwright: {error}")
        try:
            yield chromium
        finally:
            chromium.close()


def test_upload_score_and_screenshot(served, browser, tmp_path):
    url, categories = served
    category = "pushpins" if "pushpins" in categories else categories[0]
    example = EXAMPLES / f"{category}_logical.png"
    expect = sync_api.expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(urlparse(request.url).hostname or request.url))
    page.goto(url, wait_until="networkidle")
    expect(page.get_by_role("heading", name="LADMIM · logical anomaly detection")).to_be_visible()

    page.locator("#input-image input[type=file]").set_input_files(str(example))
    # the file name (<category>_<kind>.png) selects the category
    expect(page.locator("#category input")).to_have_value(category, timeout=30_000)
    page.locator("#detect").click()
    verdict = page.locator("#verdict")
    expect(verdict).to_contain_text("threshold", timeout=180_000)
    expect(verdict).to_contain_text(category)
    expect(verdict).to_contain_text("calibrated")
    assert "NORMAL" in verdict.inner_text() or "ANOMALOUS" in verdict.inner_text()
    expect(page.locator("#details")).to_contain_text("Logical branch")

    for element in ("logical-heatmap", "structural-heatmap", "mask-1", "chart-1"):
        picture = page.locator(f"#{element} img").first
        expect(picture).to_be_visible(timeout=30_000)
        assert picture.get_attribute("src"), element
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=picture.element_handle())

    page.wait_for_timeout(500)  # let the last image fade in before the screenshot
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACT), full_page=True)
    if os.environ.get("LADMIM_UPDATE_SCREENSHOT") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACT, DOCS_IMAGE)

    # A non-image renamed .png: a readable message in the page, no stack trace; then a good image again.
    fake = tmp_path / "notes.png"
    fake.write_text("not an image\n")
    page.locator("#input-image input[type=file]").set_input_files(str(fake))
    page.wait_for_timeout(500)
    page.locator("#detect").click()
    expect(verdict).to_contain_text("not an image", timeout=60_000)
    assert "Traceback" not in page.content()

    assert hosts <= {"127.0.0.1"}, f"the page contacted other hosts: {sorted(hosts)}"
    page.close()
