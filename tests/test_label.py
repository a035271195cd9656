"""label.py: the labelling page in a real headless browser (Debian's chromium and chromedriver, via selenium),
its server over real HTTP, and the labels file train.py reads."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import label_sources
import synth
from conftest import READER, ROOT
from tools.localhttp import free_port

CHROMEDRIVER = shutil.which("chromedriver")
browser_needed = pytest.mark.skipif(CHROMEDRIVER is None, reason="needs chromium and chromium-driver (apt-get; "
                                                                  ".ci/run installs them)")


class LabelServer:
    """label.py as a user starts it: its own process on 127.0.0.1."""

    def __init__(self, folder, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, str(ROOT / "label.py"), str(folder), "--port",
                                         str(self.port), *map(str, flags)], cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        for line in self.process.stdout:  # the address is printed just before the port opens
            if line.startswith("label at"):
                break
        else:
            raise AssertionError(f"label.py ended: {self.process.wait()}")
        while True:
            try:
                urllib.request.urlopen(self.url + "/api/state", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError):
                assert self.process.poll() is None, "label.py ended before serving"
                time.sleep(0.1)

    def get(self, path):
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path, body):
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def kill(self):
        self.process.send_signal(signal.SIGKILL)  # no clean shutdown: what a crash or a closed laptop does
        self.process.wait()


@pytest.fixture
def start_server():
    """LabelServer's constructor; every server it started is killed at the end, whatever the test did."""
    started = []

    def start(folder, *flags):
        started.append(LabelServer(folder, *flags))
        return started[-1]

    yield start
    for server in started:
        if server.process.poll() is None:
            server.kill()


@pytest.fixture
def captchas(tmp_path):
    """20 digit captchas named by their text, copied unnamed (0.png ...) into a folder to label; -> folder, truth."""
    named = synth.generate_synthetic(tmp_path / "named", 20, synth.Drawing(symbols="0123456789", length=4), seed=5, workers=1, progress=False)
    folder = tmp_path / "to_label"
    folder.mkdir()
    truth = {}
    for i, path in enumerate(named):
        shutil.copy(path, folder / f"{i}.png")
        truth[f"{i}.png"] = path.stem.split("_")[0]
    return folder, truth


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def shown(driver):
    return driver.find_element("id", "captcha").get_attribute("data-name")


def wait_for(condition, what):
    for _ in range(300):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"the page never showed {what}")


def type_label(driver, text):
    """Types `text` over the pre-filled guess and Enter; waits for the next image (or the end)."""
    from selenium.webdriver.common.keys import Keys

    before = shown(driver)
    driver.find_element("id", "label").send_keys(text + Keys.ENTER)
    wait_for(lambda: shown(driver) != before, f"the image after {before}")


def open_page(driver, server):
    driver.get(server.url)
    wait_for(lambda: shown(driver), "a captcha")


def saved_labels(path):
    return {key: label for key, label, _ in label_sources._entries_from_text(path.read_text(encoding="utf-8"),
                                                                              path)[0][1:]}


@browser_needed
def test_labels_typed_in_the_browser_survive_a_killed_server_and_train_py_reads_them(captchas, browser, tmp_path,
                                                                                       start_server):
    from selenium.webdriver.common.keys import Keys

    folder, truth = captchas
    out = tmp_path / "labels.csv"
    server = start_server(folder, "--model", READER, "--out", out, "--retrain_after", "15")
    open_page(browser, server)
    # the guess is pre-filled and selected, the least confident first
    guesses = json.loads(server.get("/api/state")[1])["queue"]
    assert [g["confidence"] for g in guesses] == sorted(g["confidence"] for g in guesses)
    assert shown(browser) == guesses[0]["name"]
    assert browser.find_element("id", "label").get_attribute("value") == guesses[0]["guess"]
    typed = {}
    for _ in range(8):
        name = shown(browser)
        type_label(browser, truth[name])
        typed[name] = truth[name]
    # back (ArrowUp) changes an earlier label; skip (ArrowDown) moves on without one
    box = browser.find_element("id", "label")
    box.send_keys(Keys.ARROW_UP)
    last = list(typed)[-1]
    wait_for(lambda: shown(browser) == last, "the previous image")
    assert box.get_attribute("value") == truth[last]
    type_label(browser, "7777")
    typed[last] = "7777"
    skipped = shown(browser)
    box.send_keys(Keys.ARROW_DOWN)
    wait_for(lambda: shown(browser) != skipped, "the image after the skipped one")
    assert saved_labels(out) == typed  # each label is on disk as soon as it is entered
    server.kill()

    server = start_server(folder, "--model", READER, "--out", out, "--retrain_after", "15")
    open_page(browser, server)
    state = json.loads(server.get("/api/state")[1])
    assert state["labelled"] == 8 and state["queue"][-1]["name"] == skipped  # skipped ones come last
    assert shown(browser) not in typed
    while shown(browser):
        name = shown(browser)
        type_label(browser, truth[name])
        typed[name] = truth[name]
    assert saved_labels(out) == typed and len(typed) == 20
    assert "every image is labelled" in browser.find_element("id", "where").text.lower()
    assert browser.find_element("id", "retrain").is_displayed()
    assert f"--labels {out}" in browser.find_element("id", "retrain-command").text
    found = label_sources.find_labels(folder, labels_file=out)  # what train.py --labels reads
    assert dict(found.samples) == {str(folder / name): label for name, label in typed.items()}
    assert found.skipped == {}
    server.kill()


@browser_needed
def test_a_label_with_an_unknown_symbol_or_a_new_length_is_flagged_and_saved_on_a_second_enter(captchas, browser,
                                                                                           tmp_path, start_server):
    from selenium.webdriver.common.keys import Keys

    folder, truth = captchas
    out = tmp_path / "labels.csv"
    server = start_server(folder, "--model", READER, "--out", out)
    open_page(browser, server)
    for _ in range(5):
        type_label(browser, truth[shown(browser)])
    name = shown(browser)
    box = browser.find_element("id", "label")
    box.send_keys("12x4")
    assert "x not among the 10 known symbols" in browser.find_element("id", "flag").text
    box.send_keys(Keys.BACKSPACE * 4 + "123")
    assert "no other label has length 3" in browser.find_element("id", "flag").text
    box.send_keys(Keys.ENTER)
    wait_for(lambda: "Enter again" in browser.find_element("id", "flag").text, "the confirmation")
    assert shown(browser) == name and name not in saved_labels(out)
    type_label(browser, "")  # the second Enter
    assert saved_labels(out)[name] == "123"
    server.kill()


def test_only_the_folders_own_images_are_served(captchas, tmp_path, start_server):
    folder, _ = captchas
    outside = tmp_path / "secret.png"
    shutil.copy(folder / "0.png", outside)
    os.symlink(outside, folder / "link.png")  # a link inside the folder to an image outside it
    server = start_server(folder, "--out", tmp_path / "labels.csv")
    assert server.get("/image/0.png")[0] == 200
    for path in ("/image/../secret.png", "/image/%2e%2e/secret.png", "/image/..%2Fsecret.png", "/image/link.png",
                 f"/image/{outside}", f"/image/%2F{str(outside).lstrip('/')}", "/image/../../../../etc/passwd",
                 "/image/labels.csv"):
        status, body = server.get(path)
        assert status == 404, path
        assert b"secret" not in body or b"error" in body
    assert server.post("/api/label", {"name": "../secret.png", "label": "1234"})[0] == 404
    assert not (tmp_path / "labels.csv").exists()
    assert server.post("/api/label", {"name": "0.png", "label": "  "})[0] == 400
    # started with no reader: no guesses, file order; a re-rank with a model orders by its confidence
    assert [q["guess"] for q in json.loads(server.get("/api/state")[1])["queue"]] == [""] * 20
    status, state = server.post("/api/rerank", {"model": str(READER)})
    confidences = [q["confidence"] for q in state["queue"]]
    assert status == 200 and any(q["guess"] for q in state["queue"]) and len(set(confidences)) > 1
    assert confidences == sorted(confidences)
    assert server.post("/api/rerank", {"model": str(tmp_path / "none.keras")})[0] == 400
    server.kill()


def test_a_bad_folder_or_model_is_one_line(tmp_path):
    for args, message in [([tmp_path / "nope"], "folder does not exist"),
                          ([tmp_path], "no images to label")]:
        result = subprocess.run([sys.executable, str(ROOT / "label.py"), *map(str, args)], cwd=ROOT, check=False,
                                capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and message in result.stderr
