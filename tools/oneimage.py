"""Reading one captcha with a .keras model, as a user runs it: `test.py --model M --image F` in a new process each
time, its wall seconds and peak memory, read through the model's ONNX twin (twin.py) and, with the twin set aside,
through Keras, side by side.

    python tools/oneimage.py saved_model/crnn_ctc_best.keras --image captcha.png [--repeats 5]

This script imports nothing heavy itself: a child's peak memory as Linux counts it includes what its parent held
when it started the child.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the toolkit's modules, one folder up

import twin


def read_once(model_path, image):
    """(wall seconds, peak memory in MB) of one `test.py --model M --image F` process."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "test.py", "--model", str(model_path), "--image", str(image)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        sys.exit(f"error: test.py exited with status {os.waitstatus_to_exitcode(status)} on {image}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024  # kilobytes on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .keras model with its ONNX twin beside it (train.py writes it)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    model_path, twin_file = Path(args.model), twin.twin_path(args.model)
    if model_path.suffix != ".keras" or not twin_file.exists():
        print(f"error: {model_path}: a .keras model with its ONNX twin {twin_file.name} beside it", file=sys.stderr)
        return 2
    aside = twin_file.with_name(twin_file.name + ".aside")
    for variant in ("its ONNX twin", "Keras (the twin set aside)"):
        if variant.startswith("Keras"):
            twin_file.rename(aside)
        try:
            seconds, peaks = zip(*(read_once(model_path, args.image) for _ in range(args.repeats)))
        finally:
            if aside.exists():
                aside.rename(twin_file)
        print(f"through {variant}: median {statistics.median(seconds):.2f} s a process ({args.repeats} runs, "
              f"{min(seconds):.2f}-{max(seconds):.2f}), peak memory {statistics.median(peaks):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
