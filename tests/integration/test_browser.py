"""The model page in a real browser: headless Chromium (Debian's chromium + chromium-driver)
driven by selenium against the real stack (RabbitMQ, Redis, a worker, waitress).

Charts render with a size, the form (plain HTML, no JavaScript) scores a held-out patient like
/api/v1/predictions does and marks the score on the distribution chart, and an out-of-range
value reads as an error naming the field. Screenshots go to the test's tmp_path and to
build/test-output/browser/; with MODELSERVE_UPDATE_DOCS_SCREENSHOT=1 the full page is also
written to docs/model-page.png (the README's picture).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "build" / "test-output" / "browser"
CHARTS = ("distribution", "roc", "confusion", "calibration")
WIDTH = 1280


@pytest.fixture(scope="module", autouse=True)
def chromium_installed():
    """Missing binaries fail the tests (before the stack starts), they never skip them."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: apt-get install {package} (devtools/setup.sh does)")


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through /usr/bin/chromedriver (a Service path: selenium-manager is
    never asked to download anything)."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},900", "--force-device-scale-factor=1", "--hide-scrollbars",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


def full_page_png(driver) -> bytes:
    """The whole page (not just the window), at the window's width, through DevTools."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    return base64.b64decode(shot["data"])


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def rect(driver, element) -> dict:
    return driver.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return {left: r.left, width: r.width, height: r.height};", element)


def _left_the_document(element) -> bool:
    """Like ``EC.staleness_of``, but mid-navigation Chromium may answer the probe with
    "unknown error: Node with given id does not belong to the document" (seen once in CI)
    instead of a stale-reference error: that, too, means the old page is gone."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


def submit(driver, values: dict) -> None:
    for name, value in values.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait = WebDriverWait(driver, 60)
    wait.until(lambda _: _left_the_document(old))  # a real form post: a new page
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
    # the answer page says either the result or an error
    wait.until(lambda d: d.find_elements(By.ID, "result") or d.find_elements(By.ID, "error"))


def test_model_page_charts_form_and_error_in_chromium(stack, browser, bundle, tmp_path):
    driver = browser
    driver.get(stack.url + "/")
    assert driver.title.startswith("modelserve")
    assert driver.find_elements(By.TAG_NAME, "script") == []  # works without JavaScript

    # every chart is an inline SVG that renders with a size and has an accessible name
    for ident in CHARTS:
        svg = driver.find_element(By.ID, ident)
        assert svg.tag_name == "svg" and svg.is_displayed()
        box = rect(driver, svg)
        assert svg.size["width"] > 300 and svg.size["height"] > 200, (ident, svg.size)
        assert box["width"] > 300 and box["height"] > 200, (ident, box)
        assert svg.aria_role in ("img", "image")  # Chromium reports ARIA 1.3's name
        title = svg.find_element(By.TAG_NAME, "title").get_attribute("textContent")
        assert title and title in svg.accessible_name, (ident, svg.accessible_name)
    auc = f"AUC {bundle.metadata['metrics']['roc_auc']:.3f}"
    assert auc in driver.find_element(By.ID, "roc").accessible_name
    assert driver.find_elements(By.CSS_SELECTOR, "#distribution g.marker") == []

    # a held-out patient through the form: the same answer as the API, marked on the chart
    sample = next(s for s in bundle.metadata["holdout_sample"] if 0.55 <= s["probability"] <= 0.75)
    submit(driver, sample["features"])
    result = driver.find_element(By.ID, "result").text
    match = re.search(r"probability of diabetes (\d\.\d{3}) → label (\d)", result)
    assert match, result
    api = requests.post(stack.url + "/api/v1/predictions", json={"instances": [sample["features"]]},
                        timeout=30)
    assert api.status_code == 200, api.text
    expected = api.json()["predictions"][0]
    assert expected["probability"] == pytest.approx(sample["probability"], abs=2e-6)
    assert match.group(1) == f"{expected['probability']:.3f}"
    assert int(match.group(2)) == expected["label"] == sample["predicted"]
    assert driver.find_elements(By.ID, "error") == []

    marker = driver.find_element(By.CSS_SELECTOR, "#distribution g.marker")
    assert marker.is_displayed()
    assert float(marker.get_attribute("data-probability")) == pytest.approx(expected["probability"], abs=1e-6)
    assert f"this patient {expected['probability']:.3f}" in marker.text
    line = rect(driver, marker.find_element(By.TAG_NAME, "line"))
    axis = rect(driver, driver.find_element(By.CSS_SELECTOR, "#distribution line.x-axis"))
    assert line["height"] > 100
    where = (line["left"] + line["width"] / 2 - axis["left"]) / axis["width"]
    assert where == pytest.approx(expected["probability"], abs=0.01)  # on screen, not just in the SVG
    assert "this patient's score" in driver.find_element(By.ID, "distribution").accessible_name

    png = full_page_png(driver)
    assert png_size(png)[0] == WIDTH and png_size(png)[1] > 1500
    (tmp_path / "model-page.png").write_bytes(png)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "model-page.png", OUTPUT / "model-page.png")
    if os.environ.get("MODELSERVE_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "model-page.png", ROOT / "docs" / "model-page.png")

    # an out-of-range value: a 400 page whose error names the field, and no result
    submit(driver, {**sample["features"], "glu": 400})
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.text.startswith("glu: glu=400.0 is outside [0, 300]"), error.text
    assert "plasma glucose" in error.text
    assert driver.find_element(By.ID, "glu").get_attribute("aria-invalid") == "true"
    assert driver.find_element(By.ID, "glu").get_attribute("value") == "400"
    assert driver.find_elements(By.ID, "result") == []
    assert driver.find_elements(By.CSS_SELECTOR, "#distribution g.marker") == []
    (tmp_path / "model-page-error.png").write_bytes(driver.get_screenshot_as_png())
    shutil.copyfile(tmp_path / "model-page-error.png", OUTPUT / "model-page-error.png")
