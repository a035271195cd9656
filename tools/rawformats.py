"""Copies of a labelled folder (LABEL.ext, duplicates LABEL_N.ext) named the way other captcha tools name
theirs, to check that train.py reads each one as it reads the original (docs/results.md, "Label formats").

    python tools/rawformats.py ../shared/realsets/henan4 /tmp/raw/henan4
    # -> /tmp/raw/henan4/{md5,id,csv,json}: LABEL_<md5 of the file>.ext, <random id>_LABEL.ext,
    #    <n>.ext + labels.csv (file,label with a header), <n>.ext + labels.json ({"<n>.ext": "LABEL"})
    python tools/rawformats.py ../shared/realsets/henan4 /tmp/raw/henan4 --compare
    # train.py's scan and split of each copy (no flag but --labels) against the original's

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit's modules, one folder up

import cli
import label_sources
from imagefiles import list_images


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


def compare(source, target):
    """For each copy: the rule train.py chose, and whether charset, label length and the labels of each split
    are the original's."""
    import train  # Keras: only for the comparison

    def split(data_dir, labels_file=""):
        cfg = train.TrainConfig(data_dir=str(data_dir), labels=str(labels_file))
        charset, max_len, *parts, scan, _ = train.load_dataset(cfg, Path(data_dir))
        return (charset.symbols, max_len, [sorted(label for _, label in part) for part in parts]), scan.source.rule

    original, _ = split(source)
    for name in ("md5", "id", "csv", "json"):
        folder = Path(target) / name
        copy, rule = split(folder / "images", folder / f"labels.{name}") if name in ("csv", "json") else split(folder)
        print(f"{name}: rule {rule}; charset, label length and split labels "
              f"{'identical to' if copy == original else 'DIFFERENT from'} {source}'s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder named LABEL.ext")
    parser.add_argument("target", help="a new folder (outside the repository) for the four copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="compare the copies in TARGET with SOURCE instead")
    args = parser.parse_args(argv)

    def run():
        list_images(args.source)
        if args.compare:
            compare(args.source, args.target)
        else:
            print(f"{write_formats(args.source, args.target, args.seed)} images in 4 formats under {args.target}")

    return cli.exit_status(run, FileExistsError)


if __name__ == "__main__":
    sys.exit(main())
