"""Measure speed and memory on this machine: the training loader alone, and reading captchas.

    python tools/speed.py loader data/synth/captcha --augment light       # loader images/s, peak memory
    python tools/speed.py step --preset fast --batch_size 32               # the training step alone, images/s
    python tools/speed.py ratio DIR --preset fast --recipe default --workers 2   # loader, step, fit() side by side
    python tools/speed.py inference saved_model/crnn_ctc_best.keras --folder data/synth/captcha
    python tools/speed.py inference runs/model.onnx --folder data/synth/captcha
    python tools/speed.py serve http://127.0.0.1:8000 --folder data/synth/captcha --clients 8   # serve.py running

`loader` scans the folder as train.py does and reads every batch of it through the same streaming
loader (the same number of worker threads), without a model: if it is faster than training, the
loader does not hold training back; `step` times the optimizer step alone on images already in
memory, the other side of that comparison. `inference` times test.py's own reading loop (files read and
preprocessed on other threads while the model predicts) on a folder, and the latency of one image
(read, preprocess, predict, decode), the median of --repeats after a warm-up. `serve` posts the
folder's images to a running serve.py from --clients threads at once (one image per POST /read)
and reports requests/s and the latency each client saw.
"""

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit's modules, one folder up

import augment
import cli
import dataset
import charsets
import imagefiles
import reader
import recipes
from errors import CaptchaError
from preprocess import PreprocessOptions


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def loader_batches(args):
    """The folder scanned and batched as train.py does (charset auto, canvases in memory when they fit in
    --cache_mb), shuffled and augmented as its training split is. Returns (batches, charset)."""
    dataset.pydataset_class()  # Keras imported before the clock starts
    started = time.perf_counter()
    scan = dataset.scan_folder(args.folder, None if args.charset == "auto" else charsets.charset_from_arg(args.charset))
    if not scan.samples:
        raise CaptchaError(f"{args.folder}: no usable labelled images ({scan.summary()})")
    charset = charsets.charset_for_labels(args.charset, [label for _, label in scan.samples])
    max_len = max(len(label) for _, label in scan.samples)
    scanned = time.perf_counter()
    print(f"scan: {scan.summary()} in {scanned - started:.1f} s")
    options = PreprocessOptions()
    in_memory = dataset.canvas_bytes(len(scan.samples), options) <= args.cache_mb * 2**20
    batches = dataset.make_batches(scan.samples, charset, max_len, dataset.Batching(options=options, batch_size=args.batch_size, shuffle=True, augment=args.augment), workers=args.workers, in_memory=in_memory, processes=args.processes)
    print(f"canvases: {'in memory, read' if in_memory else 'streamed from disk (over --cache_mb)'} in "
          f"{time.perf_counter() - scanned:.1f} s")
    return batches, charset


def read_batches(batches, count, workers):
    """Images/s of `count` batches read on `workers` threads, as keras.utils.PyDataset runs them for fit()."""
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        images = sum(len(x) for x, _ in pool.map(batches.__getitem__, range(count)))
    return images / (time.perf_counter() - started), images


def time_loader(args):
    batches, _ = loader_batches(args)
    count = min(len(batches), args.batches) if args.batches else len(batches)
    try:
        if args.processes:
            read_batches(batches, min(count, 2 * args.processes), batches.workers)  # the processes start
        rate, images = read_batches(batches, count, batches.workers)
    finally:
        batches.close()
    made_by = f"{args.processes} worker processes" if args.processes else f"{args.workers} worker threads"
    print(f"loader: {images} images in {images / rate:.1f} s = {rate:.0f} images/s "
          f"({made_by}, batch {args.batch_size}, augmentation {args.augment}); "
          f"peak memory {peak_memory_mb():.0f} MB")


def time_ratio(args):
    """The loader alone, the step alone and fit() end to end on one folder, preset and recipe, side by side."""
    import keras

    import model

    batches, charset = loader_batches(args)
    try:
        ratio_of(args, batches, charset, keras, model)
    finally:
        batches.close()


def ratio_of(args, batches, charset, keras, model):
    steps = min(args.steps, len(batches))
    # warm: every worker process started (a pool starts one per batch handed out while the others are busy)
    read_batches(batches, min(steps, max(4, 2 * args.processes)), batches.workers)
    loader_rate, _ = read_batches(batches, steps, batches.workers)
    recipe = dataclasses.replace(recipes.RECIPES[args.recipe], batch_size=args.batch_size)
    crnn = recipes.compile_model(model.build_model(model.PRESETS[args.preset], charset.num_classes), charset, recipe,
                               total_steps=10 * steps)
    images, labels = batches[0]
    for _ in range(3):  # compilation
        crnn.train_on_batch(images, labels)
    started = time.perf_counter()
    for _ in range(steps):
        loss = crnn.train_on_batch(images, labels)
    float(np.asarray(loss))
    step_rate = steps * len(images) / (time.perf_counter() - started)
    crnn.fit(batches, epochs=1, steps_per_epoch=3, verbose=0)  # compilation of fit's own step, and its workers
    started = time.perf_counter()
    crnn.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
    fit_rate = steps * args.batch_size / (time.perf_counter() - started)
    workers = f"{args.processes} processes" if args.processes else f"{args.workers} threads"
    print("| folder | preset | recipe | workers | loader images/s | step images/s | fit() images/s | fit / step |")
    print(f"| {args.folder} | {args.preset} | {args.recipe} | {workers} | {loader_rate:.0f} | {step_rate:.0f} | "
          f"{fit_rate:.0f} | {fit_rate / step_rate:.2f} |")
    print(f"({steps} batches of {args.batch_size}, augmentation {args.augment}; Keras {keras.backend.backend()} on "
          f"{', '.join(model.gpu_names()) or 'CPU'})")


def time_training_step(args):
    """The optimizer step alone, on random images already in memory: what the network costs on this
    machine's device, to set against the loader's images/s."""
    import keras  # (the other commands read .onnx models without Keras)

    import model

    if args.symbols:  # a large alphabet: that many hanzi (synth.py's cjk style draws from them)
        import synth

        charset = charsets.Charset(synth.cjk_symbols(args.symbols) if args.symbols <= 3755 else
                                     "".join(chr(0x4E00 + i) for i in range(args.symbols)))
    else:
        charset = charsets.charset_from_arg(args.charset)
    config = model.PRESETS[args.preset]
    keras.mixed_precision.set_dtype_policy(args.dtype_policy)
    crnn = recipes.compile_model(model.build_model(config, charset.num_classes), charset, recipes.RECIPES[args.recipe],
                               total_steps=args.steps + args.warmup)
    rng = np.random.default_rng(0)
    images = rng.random((args.batch_size, *crnn.input_shape[1:]), dtype=np.float32)
    labels = rng.integers(0, len(charset.symbols), (args.batch_size, args.length))
    for _ in range(args.warmup):  # compilation
        crnn.train_on_batch(images, labels)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = crnn.train_on_batch(images, labels)
    float(np.asarray(loss))  # the last step has finished (JAX and TensorFlow may run ahead of Python)
    seconds = time.perf_counter() - started
    devices = ", ".join(model.gpu_names()) or "CPU"
    output = crnn.layers[-1].count_params()
    print(f"training step: preset {args.preset}, {len(charset.symbols)} symbols (output layer {output:,} of "
          f"{crnn.count_params():,} weights), batch {args.batch_size}, {args.dtype_policy}: "
          f"{1000 * seconds / args.steps:.1f} ms a step "
          f"= {args.steps * args.batch_size / seconds:.0f} images/s (Keras {keras.backend.backend()} on {devices}); "
          f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def time_inference(args):
    captcha_reader = reader.Reader(args.model)  # an .onnx or .tflite model loads no TensorFlow
    paths = imagefiles.list_images(args.folder)[: args.limit]
    if not paths:
        raise CaptchaError(f"{args.folder}: no image files")
    list(captcha_reader.read_paths(paths[: args.batch_size], args.batch_size))  # warm-up
    started = time.perf_counter()
    read = list(captcha_reader.read_paths(paths, args.batch_size))
    seconds = time.perf_counter() - started
    print(f"{args.model}: folder of {len(read)} images at batch {args.batch_size}: {len(read) / seconds:.0f} images/s "
          f"(reading files included)")

    latencies = []
    for i in range(args.repeats + 5):  # the first few build and warm the graph
        started = time.perf_counter()
        captcha_reader.read(paths[i % len(paths)])
        latencies.append(time.perf_counter() - started)
    print(f"{args.model}: one image (read, preprocess, predict, decode): median "
          f"{1000 * statistics.median(latencies[5:]):.1f} ms over {args.repeats}; peak memory {peak_memory_mb():.0f} MB"
          f"; TensorFlow {'loaded' if 'tensorflow' in sys.modules else 'not loaded'}")


def time_server(args):
    import json
    import urllib.request

    from tools.localhttp import multipart

    paths = imagefiles.list_images(args.folder)[: args.limit]
    if not paths:
        raise CaptchaError(f"{args.folder}: no image files")
    bodies = []
    for path in paths:  # multipart bodies made up front: the clients time the server, not this
        bodies.append(multipart("image", [(path.name, path.read_bytes())]))

    def post(item):
        body, content_type = item
        started = time.perf_counter()
        request = urllib.request.Request(f"{args.url}/read", data=body, headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=60) as answer:
            json.loads(answer.read())
        return time.perf_counter() - started

    list(map(post, bodies[: args.clients]))  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        latencies = sorted(pool.map(post, bodies))
    seconds = time.perf_counter() - started
    print(f"{args.url}: {len(latencies)} requests from {args.clients} concurrent clients in {seconds:.1f} s = "
          f"{len(latencies) / seconds:.0f} requests/s; latency median {1000 * statistics.median(latencies):.1f} ms, "
          f"95th percentile {1000 * latencies[int(0.95 * (len(latencies) - 1))]:.1f} ms")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    loader = commands.add_parser("loader", help="images/s of the training loader alone, and peak memory")
    ratio = commands.add_parser("ratio", help="loader alone, step alone and fit() end to end, in images/s, and "
                                              "the fraction fit / step")
    for command in (loader, ratio):
        command.add_argument("folder")
        command.add_argument("--charset", default="auto", help="as train.py (default auto: the labels' symbols)")
        command.add_argument("--batch_size", type=int, default=32)
        command.add_argument("--workers", type=int, default=2, help="threads, as train.py --workers (default 2)")
        command.add_argument("--processes", type=int, default=0, help="worker processes, as train.py --processes")
        command.add_argument("--cache_mb", type=int, default=dataset.CACHE_MB,
                             help=f"as train.py: canvases in memory when they fit (default {dataset.CACHE_MB})")
        command.add_argument("--augment", default="none" if command is loader else "light", choices=augment.CHOICES,
                             help="training-time augmentation, as train.py applies it")
    loader.add_argument("--batches", type=int, default=0, help="read only this many batches (0: all)")
    ratio.add_argument("--preset", default="fast")
    ratio.add_argument("--recipe", default="default")
    ratio.add_argument("--steps", type=int, default=60, help="batches timed for each (default 60)")
    step = commands.add_parser("step", help="images/s of the training step alone (no loader)")
    step.add_argument("--preset", default="fast")
    step.add_argument("--recipe", default="default")
    step.add_argument("--charset", default="default")
    step.add_argument("--symbols", type=int, default=0, help="a charset of this many hanzi instead (large alphabets)")
    step.add_argument("--length", type=int, default=5, help="label length (default 5)")
    step.add_argument("--batch_size", type=int, default=32)
    step.add_argument("--steps", type=int, default=50)
    step.add_argument("--warmup", type=int, default=5)
    step.add_argument("--dtype_policy", default="float32", help="Keras dtype policy, e.g. mixed_bfloat16")
    inference = commands.add_parser("inference", help="images/s on a folder and one image's latency")
    inference.add_argument("model", help="a .keras, .onnx or .tflite model")
    inference.add_argument("--folder", required=True)
    inference.add_argument("--limit", type=int, default=1024, help="images of the folder to read (default 1024)")
    inference.add_argument("--batch_size", type=int, default=64)
    inference.add_argument("--repeats", type=int, default=50)
    serve = commands.add_parser("serve", help="requests/s and latency of a running serve.py under concurrent clients")
    serve.add_argument("url", help="where serve.py listens, e.g. http://127.0.0.1:8000")
    serve.add_argument("--folder", required=True)
    serve.add_argument("--limit", type=int, default=1000, help="images of the folder to post (default 1000)")
    serve.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    command = {"loader": time_loader, "ratio": time_ratio, "step": time_training_step, "inference": time_inference,
               "serve": time_server}[args.command]
    return cli.exit_status(lambda: command(args))


if __name__ == "__main__":
    sys.exit(main())
