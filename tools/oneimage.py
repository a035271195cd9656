"""Reading one captcha as a user does, in a new process each time: its wall seconds and peak memory.

    python tools/oneimage.py saved_model/crnn_ctc_best.keras --image captcha.png [--repeats 5]
    python tools/oneimage.py site.onnx --image captcha.png

A .keras model: `test.py --model M --image F`, read through the model's ONNX twin (twin.py) and, with the twin set
aside, through Keras, side by side. An .onnx model: the README's three-line Python API (`Reader.load(M).read(the
image's bytes)`) and `test.py --model M --image F`.

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


API_READ = """
import sys
from reader import Reader

reader = Reader.load(sys.argv[1])
reading = reader.read(open(sys.argv[2], "rb").read())
print(reading.text, reading.confidence, reading.low, reading.answer)
"""


def read_once(model_path, image, api=False):
    """(wall seconds, peak memory in MB) of one `test.py --model M --image F` process, or with `api` one of the
    Python API's."""
    started = time.perf_counter()
    command = ["-c", API_READ] if api else ["test.py", "--model"]
    process = subprocess.Popen([sys.executable, *command, str(model_path), *([] if api else ["--image"]), str(image)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        sys.exit(f"error: reading exited with status {os.waitstatus_to_exitcode(status)} on {image}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024  # kilobytes on Linux


def report(variant, measured, repeats):
    seconds, peaks = zip(*measured)
    print(f"{variant}: median {statistics.median(seconds):.2f} s a process ({repeats} runs, "
          f"{min(seconds):.2f}-{max(seconds):.2f}), peak memory {statistics.median(peaks):.0f} MB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .keras model with its ONNX twin beside it (train.py writes it), or an .onnx")
    parser.add_argument("--image", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    model_path, twin_file = Path(args.model).resolve(), twin.twin_path(args.model)
    image = Path(args.image).resolve()
    if model_path.suffix == ".onnx":
        for variant, api in (("the Python API", True), ("test.py", False)):
            report(f"{variant}", [read_once(model_path, image, api) for _ in range(args.repeats)], args.repeats)
        return 0
    if model_path.suffix != ".keras" or not twin_file.exists():
        print(f"error: {model_path}: a .keras model with its ONNX twin {twin_file.name} beside it, or an .onnx model",
              file=sys.stderr)
        return 2
    aside = twin_file.with_name(twin_file.name + ".aside")
    for variant in ("its ONNX twin", "Keras (the twin set aside)"):
        if variant.startswith("Keras"):
            twin_file.rename(aside)
        try:
            measured = [read_once(model_path, image) for _ in range(args.repeats)]
        finally:
            if aside.exists():
                aside.rename(twin_file)
        report(f"through {variant}", measured, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
