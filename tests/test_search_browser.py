"""The web page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver` packages) driven
with Selenium against the app served by uvicorn on 127.0.0.1. Skips when any of them is absent. A screenshot is
kept beside the test's temporary files (its path is printed)."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
import torch

import clipforge
from clipforge.data.synthetic import make_scenes
from clipforge.search.index import SearchIndex, build_index
from clipforge.search.server import create_app
from clipforge.search.writer import EmbedSettings, embed_collection

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("headless browser test needs Debian's chromium and chromium-driver packages", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An indexed store of 12 generated scenes, served by uvicorn in a thread; yields (base URL, index)."""
    import uvicorn

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("browser")
    folder = clipforge.save_model(clipforge.create_model("ViT-Nano-8"), root / "nano")
    (root / "photos").mkdir()
    for i, scene in enumerate(make_scenes(12, size=64, seed=11)):
        scene.image.save(root / "photos" / f"{i:02d}.png")
        (root / "photos" / f"{i:02d}.txt").write_text(scene.caption)
    model, preprocess, tokenizer = clipforge.load(folder)
    embed_collection([str(root / "photos")], root / "store", model, preprocess, tokenizer,
                     EmbedSettings(part_size=8, batch_size=4), checkpoint=str(folder), progress=False,
                     log=lambda line: None)
    build_index(root / "store")
    index = SearchIndex.open(root / "store")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(index), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", index, root
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def _wait_for_message(driver, text: str) -> None:
    WebDriverWait(driver, 60).until(ec.text_to_be_present_in_element((By.ID, "message"), text))


def _thumbnails_loaded(driver) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#results img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);")


def test_search_upload_and_more_like_this_in_a_browser(served, browser, tmp_path):
    base, index, root = served
    browser.get(base + "/")
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "status"), "12 items"))

    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("6")
    browser.find_element(By.ID, "query").send_keys("a red star")
    browser.find_element(By.ID, "search-button").click()
    _wait_for_message(browser, "6 results for “a red star”")
    WebDriverWait(browser, 30).until(_thumbnails_loaded)
    cards = _cards(browser)
    assert [int(c.get_attribute("data-id")) for c in cards] == [h.id for h in index.search_text("a red star", k=6)]
    first = index.store.row(int(cards[0].get_attribute("data-id")))
    assert cards[0].find_element(By.CSS_SELECTOR, ".caption").text == first["caption"]
    assert float(cards[0].find_element(By.CSS_SELECTOR, ".score").text) > float(
        cards[-1].find_element(By.CSS_SELECTOR, ".score").text)
    screenshot = tmp_path / "search-page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")

    upload = root / "photos" / "05.png"
    browser.find_element(By.ID, "image").send_keys(str(upload))
    _wait_for_message(browser, "results for image 05.png")
    WebDriverWait(browser, 30).until(_thumbnails_loaded)
    assert int(_cards(browser)[0].get_attribute("data-id")) == 5  # the image finds itself first

    _cards(browser)[0].find_element(By.CSS_SELECTOR, ".more").click()
    _wait_for_message(browser, "results for items like")
    ids = [int(c.get_attribute("data-id")) for c in _cards(browser)]
    assert ids == [h.id for h in index.search_similar(5, k=6)] and 5 not in ids



def test_a_refused_request_shows_the_error_on_the_page(served, browser):
    base, _, _ = served
    browser.get(base + "/")
    browser.execute_script("document.getElementById('k').value = '24';"
                           "document.getElementById('query').removeAttribute('maxlength');")
    browser.find_element(By.ID, "query").send_keys("y" * 1001 + "\n")  # over the server's query length limit
    WebDriverWait(browser, 30).until(lambda d: "error" in d.find_element(By.ID, "message").get_attribute("class"))
    assert "limit is 1,000" in browser.find_element(By.ID, "message").text
    assert _cards(browser) == []
