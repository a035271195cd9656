"""Two exported networks' reading time side by side: the same number of images through each, taken in turns.

    python tools/networkspeed.py A.onnx B.onnx [--batch 1 64] [--rounds 200]

Times the network alone (reader.load(...).predict_on_batch on inputs of each model's own shape), not the decoding
or the file reading, so that a difference in the input (an asked-colour model's planes) shows by itself. The two
are called in turns, round after round, so a machine that slows down slows both. Prints the median time of a
call for each batch size and the ratio B / A.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import preprocess  # noqa: E402
import reader  # noqa: E402


def input_shape(network, meta):
    """(height, width, channels) a model reads: its canvas, the image's channels and the asked colours' planes."""
    return preprocess.PreprocessOptions.from_dict(meta["preprocess"]).canvas.shape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs=2, help="two .onnx or .tflite files")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    loaded = [reader.load(path) for path in args.models]
    rng = np.random.default_rng(0)
    for batch in args.batch:
        inputs = [rng.random((batch, *input_shape(*pair)), dtype=np.float32) for pair in loaded]
        for (network, _), images in zip(loaded, inputs):  # warm-up: the first calls size the buffers
            network.predict_on_batch(images)
        times = [[], []]
        for _ in range(args.rounds):
            for i, ((network, _), images) in enumerate(zip(loaded, inputs)):
                started = time.perf_counter()
                network.predict_on_batch(images)
                times[i].append(time.perf_counter() - started)
        medians = [statistics.median(t) * 1000 for t in times]
        print(f"batch {batch}: {args.models[0]} {medians[0]:.2f} ms, {args.models[1]} {medians[1]:.2f} ms a call "
              f"(median of {args.rounds}); B / A = {medians[1] / medians[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
