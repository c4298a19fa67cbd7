"""`mpm serve --ui`: the /ui page, its assets served locally, and headless Chromium (Selenium) chatting with an
image and painting from a Chinese prompt through it, its answer equal to the API's for the same request."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.mpm.serve.test_server import data_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_CHROMIUM = "install chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does this)"
SCREENSHOT = Path(__file__).resolve().parents[3] / "benchmarks" / "_work" / "ui_screenshot.png"
ASSETS = ["/ui/static/app.js", "/ui/static/style.css"]


def test_ui_page_and_assets_are_served_locally_only_with_ui(chat_folder, serve_app):
    plain = serve_app(model=str(chat_folder))
    assert httpx.get(plain.base + "/ui").status_code == 404
    running = serve_app(model=str(chat_folder), ui=True)
    page = httpx.get(running.base + "/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(running.base + "/ui/", follow_redirects=True).text == page.text
    texts = [page.text]
    for asset in ASSETS:
        r = httpx.get(running.base + asset)
        assert r.status_code == 200, asset
        texts.append(r.text)
    for text in texts:  # nothing fetched from elsewhere: no absolute URLs, no protocol-relative ones
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), re.findall(r"https?://\S+", text)
    for element in ("image-input", "question", "send", "paint-prompt", "paint", "paint-images", "chat-model"):
        assert f'id="{element}"' in page.text
    labels = set(re.findall(r'<label for="([^"]+)"', page.text))
    inputs = set(re.findall(r'<(?:input|textarea|select) id="([^"]+)"', page.text))
    assert inputs <= labels, inputs - labels  # every field has a label
    assert httpx.get(running.url + "/models").status_code == 200  # the API is unchanged beside the page


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_CHROMIUM)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,1400",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps",
                # anything not on 127.0.0.1 fails to resolve: the page must work with no network
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=30.0, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {condition}")


def test_browser_chats_with_an_image_and_paints_from_a_chinese_prompt(browser, chat_folder, paint_folder,
                                                                      serve_app, tmp_path):  # fmt: skip
    from selenium.webdriver.common.by import By

    running = serve_app(model=str(chat_folder), paint_model=str(paint_folder), ui=True, paint_steps=2)
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(image)
    question, max_tokens = "What colour?", 12
    client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(Image.open(image))}},
                                             {"type": "text", "text": question}]}]  # fmt: skip
    wanted = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=max_tokens, temperature=0)
    wanted = wanted.choices[0].message.content
    assert wanted.strip()

    browser.get(running.base + "/ui")
    wait_for(browser, "return document.body.dataset.ready", what="the models")
    assert browser.find_element(By.ID, "chat-model").get_attribute("value") == "tiny-chat"
    assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0"  # greedy by default
    browser.find_element(By.ID, "image-input").send_keys(str(image))
    wait_for(browser, "const p = document.getElementById('image-preview'); return !p.hidden && p.naturalWidth > 0",
             what="the image preview")  # fmt: skip
    tokens = browser.find_element(By.ID, "max-tokens")
    browser.execute_script("arguments[0].value = arguments[1]", tokens, str(max_tokens))
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "send").click()
    wait_for(browser, "const a = document.getElementById('answer'); return a && a.dataset.done", what="the answer")
    answer = browser.find_element(By.ID, "answer").text
    assert "error" not in browser.find_element(By.ID, "chat-status").text
    assert answer.strip() == wanted.strip()
    assert int(browser.find_element(By.ID, "answer").get_attribute("data-chunks")) > 1  # streamed, delta by delta
    assert len(browser.find_elements(By.CSS_SELECTOR, "#conversation .turn.user img")) == 1  # the image sent shown

    browser.find_element(By.ID, "tab-paint").click()
    assert browser.find_element(By.ID, "paint-model").get_attribute("value") == "tiny-paint"
    browser.find_element(By.ID, "paint-prompt").send_keys("一只在草地上的红色狐狸")
    browser.execute_script("document.getElementById('paint-n').value = '2'")
    browser.find_element(By.ID, "paint").click()
    wait_for(browser, "return [...document.querySelectorAll('#paint-images img')].filter(i => i.naturalWidth > 0)"
                      ".length === 2", what="the painted images")  # fmt: skip
    assert browser.find_element(By.ID, "paint-status").text == ""
    alts = [img.get_attribute("alt") for img in browser.find_elements(By.CSS_SELECTOR, "#paint-images img")]
    assert all("一只在草地上的红色狐狸" in alt for alt in alts)
    assert browser.save_screenshot(str(tmp_path / "ui_paint.png"))

    # everything the page loaded or called (its assets, the API) came from this server
    urls = browser.execute_script("return [location.href, ...performance.getEntriesByType('resource')"
                                  ".map(e => e.name)]")  # fmt: skip
    assert {"/ui/static/app.js", "/ui/static/style.css", "/v1/models", "/v1/chat/completions"} <= {
        u.removeprefix(running.base) for u in urls
    }
    outside = [u for u in urls if not u.startswith(running.base + "/") and not u.startswith("data:")]
    assert not outside, outside
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    shot = tmp_path / "ui.png"
    browser.find_element(By.ID, "tab-chat").click()
    assert browser.save_screenshot(str(shot))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)


def test_browser_asks_for_the_api_key_when_the_server_needs_one(browser, chat_folder, serve_app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    running = serve_app(model=str(chat_folder), ui=True, api_key="sesame")
    browser.get(running.base + "/ui")
    wait_for(browser, "return document.body.dataset.ready", what="the page")
    assert "API key" in browser.find_element(By.ID, "chat-status").text
    assert not browser.find_element(By.ID, "send").is_enabled()
    browser.find_element(By.TAG_NAME, "summary").click()  # open the settings
    browser.find_element(By.ID, "api-key").send_keys("sesame" + Keys.TAB)
    wait_for(browser, "return document.getElementById('chat-model').value === 'tiny-chat'", what="the models")
    assert browser.find_element(By.ID, "send").is_enabled()
    assert browser.find_element(By.ID, "chat-status").text == ""
    browser.find_element(By.ID, "question").send_keys("What colour?" + Keys.ENTER)  # Enter sends
    wait_for(browser, "const a = document.getElementById('answer'); return a && a.dataset.done", what="the answer")
    assert "error" not in browser.find_element(By.ID, "chat-status").text
    assert browser.find_element(By.ID, "answer").text.strip()
