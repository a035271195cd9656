"""Keystrokes a label on the labelling page, measured in a real browser: a simulated person labels a folder.

    python tools/keystrokes.py FOLDER --count 200 --prefill none base ddddocr runs/fifty/tjsp5/crnn_ctc_best.keras

FOLDER holds labelled images (labels as train.py reads them; the images should be ones no pre-filling model
trained on, e.g. a test split). The first COUNT (sorted) are copied, numbered, into a scratch folder, and label.py
serves them with each pre-fill in turn: none, base (pretrained/base.keras), ddddocr, or a model file. Headless
chromium (chromium and chromium-driver, as the tests use) shows the page; for each captcha the simulated person
presses Enter when the pre-filled guess is the truth, else types the truth over it and Enter (and Enter again
where the page flags the label). The page's own keystroke counter is read at the end. Prints a Markdown table.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the toolkit's modules, one folder up

import cli
import label_sources
from errors import CaptchaError
from tools.localhttp import free_port


def start_page(folder, prefill, out):
    port = free_port()
    flags = [] if prefill == "none" else ["--teacher", "ddddocr"] if prefill == "ddddocr" else \
        ["--model", str(ROOT / "pretrained" / "base.keras") if prefill == "base" else prefill]
    process = subprocess.Popen([sys.executable, str(ROOT / "label.py"), str(folder), "--port", str(port), "--out",
                                str(out), *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    for line in process.stdout:
        if line.startswith("label at"):
            break
    else:
        raise CaptchaError(f"label.py ended with {process.wait()} for the pre-fill {prefill}")
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/api/state", timeout=5)
            return process, url
        except OSError:
            time.sleep(0.1)
    raise CaptchaError(f"label.py never answered on {url}")


def label_all(driver, url, truth):
    """Labels every image as a careful person would; returns (labels, keystrokes, guesses right)."""
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    box = driver.find_element("id", "label")
    image = driver.find_element("id", "captcha")

    def wait_for_change(before):
        for _ in range(2000):
            if image.get_attribute("data-name") != before:
                return
            time.sleep(0.01)
        raise CaptchaError(f"the page did not move on from {before}")

    wait_for_change("")
    right = 0
    while name := image.get_attribute("data-name"):
        if box.get_attribute("value") == truth[name]:
            right += 1
            box.send_keys(Keys.ENTER)
        else:
            box.send_keys(truth[name] + Keys.ENTER)
        for _ in range(50):  # a flagged label (a new length, an unknown symbol) waits for a second Enter
            if image.get_attribute("data-name") != name or "Enter again" in driver.find_element("id", "flag").text:
                break
            time.sleep(0.01)
        if "Enter again" in driver.find_element("id", "flag").text and image.get_attribute("data-name") == name:
            box.send_keys(Keys.ENTER)
        wait_for_change(name)
    stats = driver.find_element("id", "stats")
    return int(stats.get_attribute("data-labels")), int(stats.get_attribute("data-keys")), right


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="labelled images")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--prefill", nargs="+", default=["none", "base", "ddddocr"],
                        help="none, base, ddddocr, or model files")
    args = parser.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    try:
        found = label_sources.find_labels(Path(args.folder))
    except CaptchaError as e:
        return cli.user_error(e)
    samples = found.samples[: args.count]
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    print(f"{args.folder}: the first {len(samples)} labelled images, labelled by a simulated person on label.py\n")
    print("| pre-fill | labels | guesses right | keystrokes | keystrokes a label |")
    print("| --- | --- | --- | --- | --- |")
    try:
        for prefill in args.prefill:
            with tempfile.TemporaryDirectory() as scratch:
                folder, truth = Path(scratch) / "images", {}
                folder.mkdir()
                for i, (path, label) in enumerate(samples):
                    name = f"{i:05d}{Path(path).suffix}"
                    shutil.copy(path, folder / name)
                    truth[name] = label
                process, url = start_page(folder, prefill, Path(scratch) / "labels.csv")
                try:
                    labelled, keys, right = label_all(driver, url, truth)
                finally:
                    process.kill()
                    process.wait()
                print(f"| {prefill} | {labelled} | {right} | {keys} | {keys / labelled:.2f} |", flush=True)
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
