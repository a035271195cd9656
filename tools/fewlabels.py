"""Few labels, measured: a labelled folder split into a few labelled images, the rest unlabelled, and a test folder.

    python tools/fewlabels.py ../shared/realsets/tjsp5 /tmp/few/tjsp5 --labelled 200 500

Writes, under OUT:
  test/          the folder's own test split (the one `train.py --data_dir SRC` scores on), names kept
  labelled_N/    N images drawn (seeded) from the rest, names kept; each smaller set is inside the larger
  unlabeled/     the rest without the smallest labelled set, renamed 000000.png, ... (no label in the name),
                 and unlabeled_truth.csv beside it (file,label), for checking pseudo-labels afterwards
Then, for example:
  python train.py --data_dir OUT/labelled_200 --unlabeled OUT/unlabeled --out runs/few/tjsp5
  python test.py --model runs/few/tjsp5/round_0/crnn_ctc_best.keras --folder OUT/test   # 200 alone
  python test.py --model runs/few/tjsp5/crnn_ctc_best.keras --folder OUT/test           # 200 + unlabelled
"""

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit's modules, one folder up

import cli
import dataset
from errors import CaptchaError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder of labelled images")
    parser.add_argument("out", help="where to write test/, labelled_N/ and unlabeled/ (replaced)")
    parser.add_argument("--labelled", type=int, nargs="+", default=[200], help="sizes of the labelled sets")
    parser.add_argument("--seed", type=int, default=42, help="train.py's split seed, and the draw of the labelled")
    args = parser.parse_args(argv)
    try:
        scan = dataset.scan_folder(Path(args.source), case="auto")  # as train.py scans it
    except CaptchaError as e:
        return cli.user_error(e)
    train, val, test = dataset.split_samples(scan.samples, seed=args.seed)  # train.py's default fractions
    pool = [train[i] for i in np.random.default_rng(args.seed).permutation(len(train))] + val
    sizes = sorted(args.labelled)
    if sizes[-1] >= len(pool):
        return cli.user_error(f"{args.source}: {len(pool)} images outside the test split, fewer than {sizes[-1]}")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    def copy(samples, folder, renamed=False):
        folder.mkdir(parents=True)
        for i, (path, _) in enumerate(samples):
            shutil.copy2(path, folder / (f"{i:06d}{Path(path).suffix}" if renamed else Path(path).name))

    copy(test, out / "test")
    for size in sizes:
        copy(pool[:size], out / f"labelled_{size}")
    unlabeled = pool[sizes[0]:]
    copy(unlabeled, out / "unlabeled", renamed=True)
    with open(out / "unlabeled_truth.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "label")] + [(f"{i:06d}{Path(path).suffix}", label)
                                                       for i, (path, label) in enumerate(unlabeled)])
    print(f"{out}: test {len(test)}, " + ", ".join(f"labelled_{s} {s}" for s in sizes)
          + f", unlabeled {len(unlabeled)} (truth in unlabeled_truth.csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
