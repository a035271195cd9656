"""Measure speed and memory on this machine: the training loader alone, and reading captchas.

    python speed.py loader data/synth/captcha --augment light       # loader images/s, peak memory
    python speed.py step --preset fast --batch_size 32               # the training step alone, images/s
    python speed.py inference saved_model/crnn_ctc_best.keras --folder data/synth/captcha
    python speed.py inference runs/model.onnx --folder data/synth/captcha
    python speed.py serve http://127.0.0.1:8000 --folder data/synth/captcha --clients 8   # serve.py running

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
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import augment
import dataset
import preprocess
import reader
from preprocess import CaptchaError, PreprocessOptions


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_loader(args):
    started = time.perf_counter()
    charset = preprocess.charset_from_arg(args.charset)
    scan = dataset.scan_folder(args.folder, charset)
    if not scan.samples:
        raise CaptchaError(f"{args.folder}: no usable labelled images ({scan.summary()})")
    max_len = max(len(label) for _, label in scan.samples)
    scanned = time.perf_counter()
    print(f"scan: {scan.summary()} in {scanned - started:.1f} s")
    batches = dataset.make_batches(scan.samples, charset, max_len, PreprocessOptions(), args.batch_size,
                                      shuffle=True, workers=args.workers, augment=args.augment)
    count = min(len(batches), args.batches) if args.batches else len(batches)
    # The loader's worker threads, as keras.utils.PyDataset runs them for model.fit.
    with ThreadPoolExecutor(args.workers) as pool:
        images = sum(len(x) for x, _ in pool.map(batches.__getitem__, range(count)))
    seconds = time.perf_counter() - scanned
    print(f"loader: {images} images in {seconds:.1f} s = {images / seconds:.0f} images/s "
          f"({args.workers} worker threads, batch {args.batch_size}, augmentation {args.augment}); "
          f"peak memory {peak_memory_mb():.0f} MB")


def time_training_step(args):
    """The optimizer step alone, on random images already in memory: what the network costs on this
    machine's device, to set against the loader's images/s."""
    import keras  # (the other commands read .onnx models without Keras)

    import model

    charset = preprocess.charset_from_arg(args.charset)
    config = model.PRESETS[args.preset]
    crnn = model.compile_model(model.build_model(config, charset.num_classes), charset, model.RECIPES[args.recipe],
                               total_steps=args.steps + args.warmup)
    rng = np.random.default_rng(0)
    images = rng.random((args.batch_size, config.height, config.width, 1), dtype=np.float32)
    labels = rng.integers(0, len(charset.symbols), (args.batch_size, args.length))
    for _ in range(args.warmup):  # compilation
        crnn.train_on_batch(images, labels)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = crnn.train_on_batch(images, labels)
    float(np.asarray(loss))  # the last step has finished (JAX and TensorFlow may run ahead of Python)
    seconds = time.perf_counter() - started
    devices = ", ".join(model.gpu_names()) or "CPU"
    print(f"training step: preset {args.preset}, batch {args.batch_size}: {1000 * seconds / args.steps:.1f} ms a step "
          f"= {args.steps * args.batch_size / seconds:.0f} images/s (Keras {keras.backend.backend()} on {devices})")


def time_inference(args):
    captcha_reader = reader.Reader(args.model)  # an .onnx or .tflite model loads no TensorFlow
    paths = preprocess.list_images(args.folder)[: args.limit]
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
        captcha_reader.read_file(paths[i % len(paths)])
        latencies.append(time.perf_counter() - started)
    print(f"{args.model}: one image (read, preprocess, predict, decode): median "
          f"{1000 * statistics.median(latencies[5:]):.1f} ms over {args.repeats}; peak memory {peak_memory_mb():.0f} MB"
          f"; TensorFlow {'loaded' if 'tensorflow' in sys.modules else 'not loaded'}")


def time_server(args):
    import json
    import urllib.request
    import uuid

    paths = preprocess.list_images(args.folder)[: args.limit]
    if not paths:
        raise CaptchaError(f"{args.folder}: no image files")
    bodies = []
    for path in paths:  # multipart bodies made up front: the clients time the server, not this
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes()
        bodies.append((body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"))

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
    loader.add_argument("folder")
    loader.add_argument("--charset", default="default")
    loader.add_argument("--batch_size", type=int, default=32)
    loader.add_argument("--workers", type=int, default=2, help="threads, as train.py --workers (default 2)")
    loader.add_argument("--batches", type=int, default=0, help="read only this many batches (0: all)")
    loader.add_argument("--augment", default="none", choices=augment.CHOICES,
                        help="training-time augmentation, as train.py applies it (default none)")
    step = commands.add_parser("step", help="images/s of the training step alone (no loader)")
    step.add_argument("--preset", default="fast")
    step.add_argument("--recipe", default="default")
    step.add_argument("--charset", default="default")
    step.add_argument("--length", type=int, default=5, help="label length (default 5)")
    step.add_argument("--batch_size", type=int, default=32)
    step.add_argument("--steps", type=int, default=50)
    step.add_argument("--warmup", type=int, default=5)
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
    try:
        {"loader": time_loader, "step": time_training_step, "inference": time_inference,
         "serve": time_server}[args.command](args)
    except CaptchaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
