"""Which pseudo-label filters pay in self-training: a student's readings of unlabelled images whose truth is known,
kept by each rule, with how many are right.

    python tools/student_filters.py zero/tjsp5/round_4/crnn_ctc_best.keras /tmp/zero/tjsp5/unlabeled \\
        /tmp/zero/tjsp5/unlabeled_truth.csv --copies 3

Rows: every reading; those of a length the typed labels have; those also at or above the model's stored threshold
(selftrain.pseudo_label, as a self-training round keeps them); and those that --copies copies, altered by the
light training augmentation, also read the same (train.py --augmented_agreement). Truth is compared under the
model's letter-case fold.
"""

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit's modules, one folder up

import cli
import charsets
import imagefiles
import reader
import selftrain
from errors import CaptchaError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the student: a model file this toolkit reads")
    parser.add_argument("unlabeled", help="a folder of images")
    parser.add_argument("truth", help="their labels: a CSV of file,label (tools/fewlabels.py writes one)")
    parser.add_argument("--copies", type=int, default=3, help="augmented copies that must read the same")
    parser.add_argument("--seed", type=int, default=42, help="the augmentation's seed (train.py's --seed)")
    args = parser.parse_args(argv)
    try:
        paths = imagefiles.list_images(args.unlabeled)
        if not paths:
            raise CaptchaError(f"{args.unlabeled}: no image files")
        with open(args.truth, newline="", encoding="utf-8") as f:
            truth = {row["file"]: row["label"] for row in csv.DictReader(f)}
        missing = [p.name for p in paths if p.name not in truth]
        if missing:
            raise CaptchaError(f"{args.truth}: no label for {len(missing)} images of {args.unlabeled}, e.g. {missing[0]}")
        student = reader.Reader(args.model)
    except (CaptchaError, OSError, KeyError) as e:
        return cli.user_error(e)

    def right(texts):  # (path, text) pairs read right
        return sum(text == charsets.fold_case(truth[Path(path).name], student.case) if student.case else
                   text == truth[Path(path).name] for path, text in texts)

    every = list(student.read_paths(paths))
    readings = [r for r in every if not r.error]
    typed = [r for r in readings if student.low_confidence_rule().read_at_typed_length(r.text, r.refit)]
    confident = selftrain.select_pseudo_labels(student, every)
    steady = selftrain.steady_readings(student, confident.kept, args.copies, args.seed)
    rows = [("every reading", [(r.path, r.text) for r in readings]),
            ("of a typed length", [(r.path, r.text) for r in typed]),
            ("and at or above the stored threshold (a round's pseudo-labels)",
             [(path, text) for path, text, _ in confident.kept]),
            (f"and {args.copies} augmented copies read the same (--augmented_agreement {args.copies})",
             [(path, text) for path, text, _ in steady])]
    print(f"{args.model} on {len(paths)} images of {args.unlabeled}\n")
    print("| readings kept | kept | right | share right |\n| --- | --- | --- | --- |")
    for name, kept in rows:
        print(f"| {name} | {len(kept)} | {right(kept)} | {right(kept) / max(len(kept), 1):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
