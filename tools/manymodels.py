"""Many models in one serve.py process (serve.py --models): memory per extra model, requests/s spread over them
against one model's in the same run, and a model replaced under load.

    python tools/manymodels.py site.onnx --replacement other.onnx --folder data/synth/captcha [--models 20]

Copies MODEL into a temporary folder as m00.onnx, starts `serve.py --models` on it and measures, in order:
1. one model: its resident memory after it has read, then --requests POST /read/m00 from --clients threads;
2. --models copies of it (m00..m19, each read once): the memory per extra model, then the same requests spread
   round-robin over all of them, and their requests/s against step 1's;
3. a replacement under load: the clients read m00 while --replacement is renamed over m00.onnx; every request's
   status is kept, and the seconds from the rename to the first answer of the new model (told apart by its
   confidence on the same image, read in this process beforehand); they read on until the new model has answered.
"""

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the toolkit's modules, one folder up

import cli
import imagefiles
import reader
from tools.localhttp import call, free_port, multipart


def resident_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def until(condition, what, seconds=600):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    sys.exit(f"error: never {what}")


def load(url, names, bodies, requests, clients):
    """requests POST /read/NAME, names and images taken round-robin, from `clients` threads -> (requests/s,
    statuses)."""
    jobs = list(itertools.islice(zip(itertools.cycle(names), itertools.cycle(bodies)), requests))

    def post(job):
        name, body = job
        try:
            return call(f"{url}/read/{name}", *body, timeout=60)[0]
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return f"{type(e).__name__}"

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(post, jobs))
    return requests / (time.perf_counter() - started), statuses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an .onnx model")
    parser.add_argument("--replacement", required=True, help="another .onnx model, renamed over the first under load")
    parser.add_argument("--folder", required=True, help="captcha images to post")
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    paths = imagefiles.list_images(args.folder)[:100]
    if not paths:
        return cli.user_error(f"{args.folder}: no image files")
    bodies = [multipart("image", [(path.name, path.read_bytes())]) for path in paths]
    old_confidence = reader.Reader.load(args.model).read(paths[0]).confidence
    new_confidence = reader.Reader.load(args.replacement).read(paths[0]).confidence
    if abs(old_confidence - new_confidence) < 1e-3:
        print("error: the two models read the first image alike; pass a --replacement that reads it otherwise",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        shutil.copy(args.model, folder / "m00.onnx")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "serve.py", "--models", str(folder), "--port", str(port), "--poll",
                                   "0.25"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def answers():
                try:
                    return call(f"{url}/health")[0] == 200
                except (urllib.error.URLError, ConnectionError):
                    return False

            until(answers, "answered /health")
            # ---- 1. one model
            load(url, ["m00"], bodies, 4 * args.clients, args.clients)  # warm-up
            one_mb = resident_mb(server.pid)
            one_rate, statuses = load(url, ["m00"], bodies, args.requests, args.clients)
            print(f"1 model: {one_mb:.0f} MB resident; {args.requests} requests from {args.clients} clients: "
                  f"{one_rate:.0f} requests/s ({sum(s != 200 for s in statuses)} failed)")
            # ---- 2. many models
            names = [f"m{i:02d}" for i in range(args.models)]
            for name in names[1:]:
                shutil.copy(args.model, folder / f".{name}.tmp")
                os.replace(folder / f".{name}.tmp", folder / f"{name}.onnx")
            until(lambda: len(call(f"{url}/models")[1]["models"]) == args.models, f"served {args.models} models")
            load(url, names, bodies, 4 * len(names), args.clients)  # each model reads before memory is counted
            many_mb = resident_mb(server.pid)
            many_rate, statuses = load(url, names, bodies, args.requests, args.clients)
            print(f"{args.models} models: {many_mb:.0f} MB resident, {(many_mb - one_mb) / (args.models - 1):.1f} MB "
                  f"per extra model; {args.requests} requests spread over them: {many_rate:.0f} requests/s = "
                  f"{many_rate / one_rate:.0%} of one model's ({sum(s != 200 for s in statuses)} failed)")
            # ---- 3. a model replaced under load
            seen, stop = [], threading.Event()
            body = bodies[0]

            def client():
                while not stop.is_set():
                    try:
                        status, answer = call(f"{url}/read/m00", *body, timeout=60)
                    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                        status, answer = type(e).__name__, {}
                    seen.append((time.monotonic(), status, answer.get("confidence")))

            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            until(lambda: len(seen) >= args.requests // 2, "read half the requests")
            shutil.copy(args.replacement, folder / ".m00.tmp")
            renamed = time.monotonic()
            os.replace(folder / ".m00.tmp", folder / "m00.onnx")

            def answered_by_new():
                return [t for t, status, confidence in list(seen) if status == 200 and confidence is not None
                        and abs(confidence - new_confidence) < abs(confidence - old_confidence)]

            until(lambda: len(seen) >= args.requests and answered_by_new(), "read the other half with the new model")
            stop.set()
            for thread in threads:
                thread.join()
            failed = sum(status != 200 for _, status, _ in seen)
            took = f"{min(answered_by_new()) - renamed:.2f} s after the rename"
            print(f"replaced under load: {len(seen)} requests, {failed} failed; the new model answered {took}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
