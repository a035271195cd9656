"""The labelling page's screenshot for the README, taken in headless chromium.

    python tools/label_screenshot.py docs/label_page.png

Draws 60 synthetic captchas (seed 21) into a scratch folder, serves them with label.py pre-filled by the shipped
base model, labels the first 6 by their truth, types 3 symbols of the next (a length no label has: the page flags
it), and saves the page as it then stands.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the toolkit's modules, one folder up

import synth
from tools.keystrokes import start_page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="docs/label_page.png", help="the PNG to write")
    out = Path(parser.parse_args(argv).out)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "captchas"
        drawn = synth.generate_synthetic(Path(scratch) / "drawn", 60, seed=21, workers=1, progress=False)
        folder.mkdir()
        truth = {}
        for i, path in enumerate(drawn):
            shutil.copy(path, folder / f"{i:04d}.png")
            truth[f"{i:04d}.png"] = path.stem.split("_")[0]
        process, url = start_page(folder, "base", Path(scratch) / "labels.csv")
        options = webdriver.ChromeOptions()
        for argument in ("--headless=new", "--no-sandbox", "--window-size=900,640", "--hide-scrollbars"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            driver.get(url)
            image, box = driver.find_element("id", "captcha"), driver.find_element("id", "label")
            for _ in range(6):
                name = image.get_attribute("data-name")
                box.send_keys(truth[name] + Keys.ENTER)
                while image.get_attribute("data-name") == name:
                    pass
            box.send_keys(truth[image.get_attribute("data-name")][:3])  # a length no label has: flagged
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
            process.kill()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
