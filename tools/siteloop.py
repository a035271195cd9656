"""The site's answers as labels, measured: a simulated site accepts a reading when it equals the truth.

    python tools/siteloop.py runs/fifty/tjsp5/crnn_ctc_best.keras /tmp/zero/tjsp5/unlabeled \
        /tmp/zero/tjsp5/unlabeled_truth.csv /tmp/zero/tjsp5/test --serve 1000 1000 --out runs/siteloop/tjsp5

Each cycle serves the next --serve N images of UNLABELED through `serve.py --collect OUT/collected` (real HTTP on
127.0.0.1), answers every reading with POST /feedback (accepted when it equals the truth in TRUTH_CSV, file,label,
compared under the model's letter-case fold), then retrains with `train.py --data_dir OUT/collected/accepted
--init_from <the current model>` (and `--unlabeled OUT/collected/rejected` with --with_rejected) and scores the
new model on TEST with test.py. Accepted images pile up over the cycles. Prints a Markdown table; each retraining's
output goes to OUT/cycle_N.log (with --with_rejected, its self-training lines say how many readings the site's
rejections kept out). A cycle whose model exists is not run again (run the same command to resume).
"""

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the toolkit's modules, one folder up

from charsets import fold_case
from imagefiles import list_images
from tools.localhttp import call, free_port, multipart


def read(url, path):
    return call(url + "/read", *multipart("image", [(path.name, path.read_bytes())]))[1]


def serve_and_answer(model, paths, truth, collect):
    """serve.py --collect; every image read and answered as the site would. -> accepted count."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(model), "--port", str(port),
                                "--collect", str(collect)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                status, meta = call(url + "/model")
                break
            except OSError:
                if process.poll() is not None:
                    raise SystemExit(f"error: serve.py ended ({process.returncode})") from None
                time.sleep(0.2)
        case = meta.get("case")
        accepted = 0
        for path in paths:
            answer = read(url, path)
            right = answer["text"] == fold_case(truth[path.name], case)
            accepted += right
            status, _ = call(url + "/feedback", json.dumps({"id": answer["id"], "accepted": right}).encode(),
                             "application/json")
            assert status == 200, status
        return accepted
    finally:
        process.terminate()
        process.wait()


def exact_match(model, test):
    result = subprocess.run([sys.executable, str(ROOT / "test.py"), "--model", str(model), "--folder", str(test),
                             "--labels_from", "auto"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if "exact match" in line)
    return line.split("exact match")[1].split()[0].rstrip(",;")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model the site loop starts from")
    parser.add_argument("unlabeled", help="the images the simulated site shows")
    parser.add_argument("truth", help="their labels, CSV file,label")
    parser.add_argument("test", help="a labelled test folder")
    parser.add_argument("--serve", type=int, nargs="+", default=[2000], help="images served in each cycle")
    parser.add_argument("--out", required=True)
    parser.add_argument("--with_rejected", action="store_true",
                        help="retrain with the rejected images too, as unlabelled (self-training, train.py "
                             "--unlabeled): a reading the site rejected is never their pseudo-label")
    parser.add_argument("--train", nargs=argparse.REMAINDER, default=[], help="more train.py flags, last")
    args = parser.parse_args(argv)
    out = Path(args.out)
    with open(args.truth, newline="", encoding="utf-8") as f:
        truth = {row[0]: row[1] for row in csv.reader(f) if row and row[0] != "file"}
    paths = [p for p in list_images(args.unlabeled) if p.name in truth]
    model, start = Path(args.model), 0
    print(f"start: {model}, test exact match {exact_match(model, args.test)} on {args.test}\n")
    print("| cycle | read | accepted | accepted so far | test exact match after retraining |")
    print("| --- | --- | --- | --- | --- |")
    for cycle, count in enumerate(args.serve, 1):
        served = paths[start : start + count]
        start += count
        cycle_out = out / f"cycle_{cycle}"
        record = out / f"served_{cycle}.json"
        if record.is_file():
            accepted = json.loads(record.read_text())["accepted"]
        else:
            accepted = serve_and_answer(model, served, truth, out / "collected")
            record.write_text(json.dumps({"read": len(served), "accepted": accepted}))
        so_far = len(list_images(out / "collected" / "accepted"))
        best = cycle_out / "crnn_ctc_best.keras"
        if not best.is_file():
            interrupted = (cycle_out / "crnn_ctc_resume.keras").is_file() or (cycle_out / "self_training.json").is_file()
            rejected = ["--unlabeled", str(out / "collected" / "rejected")] if args.with_rejected else []
            flags = (["--resume"] if interrupted else
                     ["--data_dir", str(out / "collected" / "accepted"), "--init_from", str(model), *rejected,
                      *args.train])
            with open(out / f"cycle_{cycle}.log", "a") as log:
                subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--out", str(cycle_out)], cwd=ROOT,
                               check=True, stdout=log)
        model = best
        print(f"| {cycle} | {len(served)} | {accepted} | {so_far} | {exact_match(model, args.test)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
