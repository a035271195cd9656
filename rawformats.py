"""Copies of a labelled folder (LABEL.ext, duplicates LABEL_N.ext) named the way other captcha tools name
theirs, to check that train.py reads each one as it reads the original (docs/results.md, "Label formats").

    python rawformats.py ../shared/realsets/henan4 /tmp/raw/henan4
    # -> /tmp/raw/henan4/{md5,id,csv,json}: LABEL_<md5 of the file>.ext, <random id>_LABEL.ext,
    #    <n>.ext + labels.csv (file,label with a header), <n>.ext + labels.json ({"<n>.ext": "LABEL"})

The copies are symbolic links to the original files; the numbering is a seeded shuffle, so it says
nothing about the labels. Nothing is written inside the repository.
"""

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import labels as label_sources
from preprocess import CaptchaError, list_images


def write_formats(source, target, seed=0):
    found = label_sources.find_labels(source, "name")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(found.samples))
    formats = {name: Path(target) / name for name in ("md5", "id", "csv", "json")}
    for folder in formats.values():
        folder.mkdir(parents=True, exist_ok=False)
    table = {}
    for n, index in enumerate(order, start=1):
        path, label = found.samples[index]
        path = Path(path).resolve()
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        random_id = "".join(rng.choice(list("0123456789abcdef"), 8))
        (formats["md5"] / f"{label}_{digest}{path.suffix}").symlink_to(path)
        (formats["id"] / f"{random_id}_{label}{path.suffix}").symlink_to(path)
        for name in ("csv", "json"):
            (formats[name] / "images").mkdir(exist_ok=True)
            (formats[name] / "images" / f"{n}{path.suffix}").symlink_to(path)
        table[f"{n}{path.suffix}"] = label
    with open(formats["csv"] / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows(table.items())
    (formats["json"] / "labels.json").write_text(json.dumps(table, indent=0))
    return len(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder named LABEL.ext")
    parser.add_argument("target", help="a new folder (outside the repository) for the four copies")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        list_images(args.source)
        count = write_formats(args.source, args.target, args.seed)
    except (CaptchaError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{count} images in 4 formats under {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
