"""How well a person reads a folder's captchas, beside a model on the same images: it tells a model that
reads less than its pictures show from pictures that show less than their labels.

    python tools/eyeread.py sheets data/heldout_big/hershey_test2k --out runs/eye_hershey --count 96 --seed 8
    # look at runs/eye_hershey/sheet_*.png (numbered images, no labels) and type what each shows into
    # runs/eye_hershey/readings.txt after its number: "7: ab3k4"; nothing after the colon: could not read;
    # "-": leave this image out (you saw its label before)
    python test.py --model M --folder data/heldout_big/hershey_test2k --output runs/eye_hershey/model.json
    python tools/eyeread.py score runs/eye_hershey --model_readings runs/eye_hershey/model.json

`sheets` draws a seeded sample of the folder's labelled images (labels as train.py reads them) onto
numbered sheets, and keeps the answer key in sample.json; `score` compares the typed readings with the
labels, and with the model's readings of the same images when given (test.py --output's JSON), then writes
score.json beside them.
"""

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit's modules, one folder up

import cli
import label_sources
import metrics
from errors import CaptchaError
from preprocess import read_image

SHEET_COLUMNS, SHEET_ROWS = 3, 4
TILE_HEIGHT, TILE_WIDTH, NUMBER_BAND = 110, 300, 30  # each image scaled to 110 px high, at most 300 wide
TILE_SHAPE = (NUMBER_BAND + TILE_HEIGHT, TILE_WIDTH + 10, 3)  # a number band above the image, a margin right of it
SAMPLE_NAME, READINGS_NAME, SCORE_NAME = "sample.json", "readings.txt", "score.json"
READING_LINE = re.compile(r"^\s*(\d+)\s*:\s*(\S*)\s*$")


def tile(path, number):
    """One image on white, its number above it."""
    image = read_image(path, channels=3)
    scale = min(TILE_HEIGHT / image.shape[0], TILE_WIDTH / image.shape[1])
    image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                       interpolation=cv2.INTER_CUBIC)
    canvas = np.full(TILE_SHAPE, 255, np.uint8)
    canvas[NUMBER_BAND : NUMBER_BAND + image.shape[0], : image.shape[1]] = image
    cv2.putText(canvas, str(number), (4, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2)
    return canvas


def write_sheets(folder, out, count, seed, labels_from="auto", labels_file=None):
    """Sheets of `count` of the folder's labelled images (a seeded sample), the key and a readings form."""
    found = label_sources.find_labels(folder, labels_from, labels_file)
    if not found.samples:
        raise CaptchaError(f"{folder}: no labelled images to sample")
    sample = random.Random(seed).sample(found.samples, min(count, len(found.samples)))
    out = Path(out)
    form = out / READINGS_NAME
    if form.exists() and any(m and m.group(2) for m in map(READING_LINE.match, form.read_text().splitlines())):
        raise CaptchaError(f"{form}: holds typed readings; sheets would replace them (give another --out)")
    out.mkdir(parents=True, exist_ok=True)
    per_sheet = SHEET_COLUMNS * SHEET_ROWS
    blank = np.full(TILE_SHAPE, 255, np.uint8)
    for start in range(0, len(sample), per_sheet):
        tiles = [tile(path, start + i + 1) for i, (path, _) in enumerate(sample[start : start + per_sheet])]
        tiles += [blank] * (-len(tiles) % SHEET_COLUMNS)
        rows = [np.hstack(tiles[i : i + SHEET_COLUMNS]) for i in range(0, len(tiles), SHEET_COLUMNS)]
        cv2.imwrite(str(out / f"sheet_{start // per_sheet + 1}.png"), np.vstack(rows))
    (out / SAMPLE_NAME).write_text(json.dumps({"folder": str(folder), "seed": seed, "samples": [
        {"number": i + 1, "path": str(path), "label": label} for i, (path, label) in enumerate(sample)]}, indent=2))
    form.write_text("".join(f"{i + 1}: \n" for i in range(len(sample))))
    print(f"{len(sample)} of {len(found.samples)} labelled images of {folder} on "
          f"{-(-len(sample) // per_sheet)} sheets in {out}; type what they show into {form}")


def read_readings(path, numbers):
    """{number: reading} from the readings form; '' could not be read; images marked '-' are left out."""
    readings = {}
    for line_number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = READING_LINE.match(line)
        if not match:
            raise CaptchaError(f"{path}, line {line_number}: expected 'NUMBER: READING', got {line.strip()!r}")
        readings[int(match.group(1))] = match.group(2)
    missing = sorted(set(numbers) - set(readings))
    if missing:
        raise CaptchaError(f"{path}: no line for image(s) {', '.join(map(str, missing[:10]))}"
                           + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    return {number: reading for number, reading in readings.items() if number in numbers and reading != "-"}


def score(out, model_readings=None):
    """The eye's exact match (and the model's on the same images), written to score.json."""
    out = Path(out)
    if not (out / SAMPLE_NAME).exists():
        raise CaptchaError(f"{out / SAMPLE_NAME}: missing; run `python tools/eyeread.py sheets FOLDER --out {out}` first")
    samples = {s["number"]: s for s in json.loads((out / SAMPLE_NAME).read_text())["samples"]}
    eye = read_readings(out / READINGS_NAME, samples)
    kept = [samples[n] for n in sorted(eye)]
    truths = [s["label"] for s in kept]
    result = {"images": len(kept), "left_out": len(samples) - len(kept),
              "eye": metrics.score([eye[s["number"]] for s in kept], truths)}
    print(f"{len(kept)} images read by eye ({result['left_out']} left out): exact match "
          f"{result['eye']['exact_match']:.4f} ({round(result['eye']['exact_match'] * len(kept))} of {len(kept)}), "
          f"ignoring case {result['eye']['exact_match_ignore_case']:.4f}, CER {result['eye']['cer']:.4f}")
    if model_readings:
        by_path = {str(Path(r["path"]).resolve()): r["prediction"]
                   for r in json.loads(Path(model_readings).read_text())["readings"]}
        model_text = [by_path.get(str(Path(s["path"]).resolve())) for s in kept]
        missing = [s["path"] for s, text in zip(kept, model_text) if text is None]
        if missing:
            raise CaptchaError(f"{model_readings}: no reading of {missing[0]} (and {len(missing) - 1} more of the "
                               f"sample); read the sample's folder with test.py --output")
        result["model"] = {"readings": str(model_readings), **metrics.score(model_text, truths)}
        outcome = Counter((eye[s["number"]] == s["label"], text == s["label"]) for s, text in zip(kept, model_text))
        result["both"] = {"right": outcome[True, True], "eye_only": outcome[True, False],
                          "model_only": outcome[False, True], "neither": outcome[False, False]}
        print(f"the model on the same images: exact match {result['model']['exact_match']:.4f}; both right "
              f"{result['both']['right']}, the eye only {result['both']['eye_only']}, the model only "
              f"{result['both']['model_only']}, neither {result['both']['neither']}")
    (out / SCORE_NAME).write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sheets = commands.add_parser("sheets", help="numbered sheets of a seeded sample, without labels")
    sheets.add_argument("folder")
    sheets.add_argument("--out", required=True)
    sheets.add_argument("--count", type=int, default=96)
    sheets.add_argument("--seed", type=int, default=8)
    sheets.add_argument("--labels_from", default="auto", help="the file-name rule, as train.py's")
    sheets.add_argument("--labels_file", default=None, help="a labels file beside the images, as train.py's")
    scoring = commands.add_parser("score", help="the typed readings against the labels (and a model's readings)")
    scoring.add_argument("out")
    scoring.add_argument("--model_readings", default=None, help="test.py --output's JSON for the sample's folder")
    args = parser.parse_args(argv)
    if args.command == "sheets":
        return cli.exit_status(lambda: write_sheets(args.folder, args.out, args.count, args.seed, args.labels_from,
                                                    args.labels_file), OSError)
    return cli.exit_status(lambda: score(args.out, args.model_readings), OSError, json.JSONDecodeError, KeyError)


if __name__ == "__main__":
    sys.exit(main())
