"""Measure speed and memory on this machine: the training loader alone, and reading captchas.

    python speed.py loader data/synth/captcha                       # loader images/s, peak memory
    python speed.py inference saved_model/crnn_ctc_best.keras --folder data/synth/captcha
    python speed.py inference runs/model.onnx --folder data/synth/captcha

`loader` scans the folder as train.py does and reads every batch of it through the same streaming
loader (the same number of worker threads), without a model: if it is faster than training, the
loader does not hold training back. `inference` times test.py's own reading loop (files read and
preprocessed on other threads while the model predicts) on a folder, and the latency of one image
(read, preprocess, predict, decode), the median of --repeats after a warm-up.
"""

import argparse
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import model  # first: it quiets TensorFlow's logging before Keras loads it
import numpy as np

import preprocess
import test as reader  # this project's test.py (the script directory comes first on sys.path)
from preprocess import CaptchaError, Charset, PreprocessOptions


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_loader(args):
    started = time.perf_counter()
    charset = preprocess.charset_from_arg(args.charset)
    scan = preprocess.scan_folder(args.folder, charset)
    if not scan.samples:
        raise CaptchaError(f"{args.folder}: no usable labelled images ({scan.summary()})")
    max_len = max(len(label) for _, label in scan.samples)
    scanned = time.perf_counter()
    print(f"scan: {scan.summary()} in {scanned - started:.1f} s")
    batches = preprocess.make_batches(scan.samples, charset, max_len, PreprocessOptions(), args.batch_size,
                                      shuffle=True, workers=args.workers)
    count = min(len(batches), args.batches) if args.batches else len(batches)
    # The loader's worker threads, as keras.utils.PyDataset runs them for model.fit.
    with ThreadPoolExecutor(args.workers) as pool:
        images = sum(len(x) for x, _ in pool.map(batches.__getitem__, range(count)))
    seconds = time.perf_counter() - scanned
    print(f"loader: {images} images in {seconds:.1f} s = {images / seconds:.0f} images/s "
          f"({args.workers} worker threads, batch {args.batch_size}); peak memory {peak_memory_mb():.0f} MB")


def time_inference(args):
    network, meta = model.load_model(args.model)
    charset = Charset.from_dict(meta["charset"])
    options = PreprocessOptions.from_dict(meta["preprocess"])
    paths = preprocess.list_images(args.folder)[: args.limit]
    if not paths:
        raise CaptchaError(f"{args.folder}: no image files")
    list(reader.predict_paths(network, charset, paths[: args.batch_size], options, args.batch_size))  # warm-up
    started = time.perf_counter()
    read = list(reader.predict_paths(network, charset, paths, options, args.batch_size))
    seconds = time.perf_counter() - started
    print(f"{args.model}: folder of {len(read)} images at batch {args.batch_size}: {len(read) / seconds:.0f} images/s "
          f"(reading files included)")

    latencies = []
    for i in range(args.repeats + 5):  # the first few build and warm the graph
        started = time.perf_counter()
        image = preprocess.load_image(paths[i % len(paths)], options)
        model.decode(network.predict_on_batch(image[np.newaxis]), charset)
        latencies.append(time.perf_counter() - started)
    print(f"{args.model}: one image (read, preprocess, predict, decode): median "
          f"{1000 * statistics.median(latencies[5:]):.1f} ms over {args.repeats}; peak memory {peak_memory_mb():.0f} MB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    loader = commands.add_parser("loader", help="images/s of the training loader alone, and peak memory")
    loader.add_argument("folder")
    loader.add_argument("--charset", default="default")
    loader.add_argument("--batch_size", type=int, default=32)
    loader.add_argument("--workers", type=int, default=2, help="threads, as train.py --workers (default 2)")
    loader.add_argument("--batches", type=int, default=0, help="read only this many batches (0: all)")
    inference = commands.add_parser("inference", help="images/s on a folder and one image's latency")
    inference.add_argument("model", help="a .keras, .onnx or .tflite model")
    inference.add_argument("--folder", required=True)
    inference.add_argument("--limit", type=int, default=1024, help="images of the folder to read (default 1024)")
    inference.add_argument("--batch_size", type=int, default=64)
    inference.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        time_loader(args) if args.command == "loader" else time_inference(args)
    except CaptchaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
