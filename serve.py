"""Serve trained models over HTTP (FastAPI on uvicorn): one model file, or a folder of models read by name.

    python serve.py --model saved_model/crnn_ctc_best.onnx --port 8000
    python serve.py --models models/ --port 8000          # models/site-a.onnx is read at /read/site-a
    curl -F image=@captcha.png http://127.0.0.1:8000/read
    curl -F image=@captcha.png http://127.0.0.1:8000/read/site-a
    curl -H 'Content-Type: application/json' -d '{"image": "'$(base64 -w0 captcha.png)'"}' http://127.0.0.1:8000/read

Endpoints (every answer is JSON; a bad request gets a 4xx with {"error": "..."}, never a crash):
  POST /read[/NAME] one image: a multipart file field `image`, or JSON {"image": "<base64>"}
                    -> {"text", "confidence", "low_confidence", "milliseconds"}; with --answer arithmetic (or a
                    model trained with it) also "answer" (the value, or null and a "reason") and "expression"
  POST /read_batch[/NAME]  several: multipart fields `images`, or JSON {"images": ["<base64>", ...]}
                    -> {"results": [{"text", "confidence", "low_confidence"}, ...], "milliseconds"}
                    A model trained with the asked colour ("type the red characters") takes it as a form field
                    `colour` (or `color`) or a JSON key of that name: one name, or a list of one per image
  POST /feedback    with --collect: {"id": "<an answer's id>", "accepted": true|false}, what the site said of a
                    reading -> {"filed": "<path>"}; an unknown id gets 404, one filed before 409
  GET  /health      -> {"status": "ok"}
  GET  /models      -> {"models": {NAME: its charset, kind (answer), threshold, file}, "refused": {NAME: why}}
  GET  /model[/NAME] the model's metadata: charset, label length, preprocessing, network, reading settings
Without NAME, /read reads with the one model served; with several, NAME is needed (a 400 lists them), and an
unknown NAME gets 404 with the names there are. low_confidence: the confidence is below the model's stored threshold
(or --min_confidence), or the text has a length no label typed for the model has; a caller should fetch a new
captcha instead.

--models DIR serves every .onnx, .keras and .tflite file in DIR under its name, and follows the folder while it
runs (modelfolder.py): a file added, replaced or removed takes effect within about two seconds, requests in flight
finish on the model they started with, a file still being copied in is not loaded until it stops changing, and a
file that does not load is refused in one logged line (GET /models says why) while the others serve.

With --collect DIR every answer carries an "id", and the image is kept (in memory, the newest --collect_max;
the oldest is dropped) until its feedback files it: a reading the site accepted is a label, so the image goes to
DIR/accepted/ named LABEL_ID.png (LABEL_md5 names: `train.py --data_dir DIR/accepted` reads them; every accepted
label is also in DIR/accepted/labels.csv, for labels that cannot be file names, e.g. `3*4=?`); a rejected one goes
to DIR/rejected/, its wrong reading in DIR/rejected/readings.csv, for the labelling page (label.py). With --models,
each model's answers go to DIR/NAME/accepted and DIR/NAME/rejected: one labelling loop per site.

A .keras, .onnx or .tflite model; .onnx (export_safe.py --format onnx, or the twin a training run writes beside
its .keras file) serves without TensorFlow and reads concurrent requests in parallel. Each model reads one blank
image when it loads, so the first request is not the slow one.
"""

import argparse
import base64
import binascii
import csv
import json
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import cli
import arithmetic
import label_sources
import modelfolder
import reader
from errors import CaptchaError

MAX_IMAGE_BYTES = 2_000_000  # a captcha is a few kilobytes; anything this large is not one
MAX_BATCH = 64
COLLECT_MAX = 10_000  # images kept awaiting feedback: a few kilobytes each
UNSAFE_IN_NAMES = re.compile(r'[\x00-\x1f/\\:*?"<>|_]|^[.-]|[. ]$')  # and "_", which separates the id
IMAGE_SIGNATURES = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"BM": ".bmp", b"RIFF": ".webp"}


class Collector:
    """Images read, kept under an unguessable id until the caller says whether the site accepted the reading; then
    filed under DIR/accepted (a labelled image) or DIR/rejected. Bounded: past `limit` the oldest is dropped."""

    def __init__(self, folder, limit=COLLECT_MAX):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.waiting = OrderedDict()  # id -> (image bytes, reading, the model's name or None)
        self.filed = deque(maxlen=limit)  # ids already answered, to tell a repeat from an unknown id
        self.filed_set = set()
        self.lock = threading.Lock()

    def folders(self, model_name=None):
        """(accepted, rejected) folders: DIR/accepted and DIR/rejected, or DIR/NAME/... for a model of a folder."""
        base = self.folder / model_name if model_name else self.folder
        return base / "accepted", base / "rejected"

    def keep(self, data, text, model_name=None):
        token = secrets.token_hex(16)
        with self.lock:
            self.waiting[token] = (data, text, model_name)
            while len(self.waiting) > self.limit:
                self.waiting.popitem(last=False)
        return token

    def file(self, token, accepted):
        with self.lock:
            if token not in self.waiting:
                if token in self.filed_set:
                    raise RequestError(409, f"id {token} was filed before")
                raise RequestError(404, f"unknown id {token!r} (never given, or dropped: the newest {self.limit} "
                                        f"are kept)")
            data, text, model_name = self.waiting.pop(token)
            accepted_folder, rejected_folder = self.folders(model_name)
            if len(self.filed) == self.filed.maxlen:
                self.filed_set.discard(self.filed[0])
            self.filed.append(token)
            self.filed_set.add(token)
            extension = next((e for sig, e in IMAGE_SIGNATURES.items() if data.startswith(sig)), ".png")
            if accepted:
                name = f"{text}_{token}{extension}" if text and not UNSAFE_IN_NAMES.search(text) else \
                    f"{token}{extension}"
                path, table = accepted_folder / name, accepted_folder / "labels.csv"
            else:
                path, table = rejected_folder / f"{token}{extension}", rejected_folder / label_sources.REJECTED_READINGS_NAME
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            with open(table, "a", encoding="utf-8", newline="") as f:
                csv.writer(f, lineterminator="\n").writerow([path.name, text])
        return path


class RequestError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


async def read_body(request, limit):
    """The request's body, refused (413) as soon as it passes `limit` bytes, declared or not."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request of {int(declared)} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request over {limit} bytes")
    return bytes(body)


COLOUR_FIELDS = ("colour", "color")  # the colour a captcha asks for ("type the red characters"): a form field or JSON key


def colours_for(given, count):
    """The asked colour of each of `count` images from what a request gave: nothing, one for all, or one each."""
    given = [given] if isinstance(given, str) else list(given or [])
    if any(not isinstance(colour, str) for colour in given):
        raise RequestError(400, "the colour is a name, e.g. \"red\"")
    if not given:
        return [None] * count
    if len(given) == 1:
        return given * count
    if len(given) != count:
        raise RequestError(400, f"{len(given)} colours for {count} images: give one for all, or one each")
    return given


async def images_from(request, field, limit):
    """([(name, encoded image bytes, the colour it asks for or None)]) from a multipart form (files in `field`, the
    colour in a `colour` field) or JSON ({field: base64 or list, "colour": a name or list})."""
    body = await read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except Exception as e:  # a malformed multipart body
            raise RequestError(400, f"unreadable multipart form ({e})") from None
        uploads = form.getlist(field)
        if not uploads or any(isinstance(u, str) for u in uploads):
            raise RequestError(400, f"send the image as a file in the form field {field!r}")
        colours = colours_for([c for name in COLOUR_FIELDS for c in form.getlist(name)], len(uploads))
        return [(u.filename or f"{field}[{i}]", await u.read(), colour)
                for i, (u, colour) in enumerate(zip(uploads, colours))]
    if content_type.startswith("application/json"):
        try:
            sent = json.loads(body)
            value = sent[field]
        except (ValueError, KeyError, TypeError):
            raise RequestError(400, f"send JSON with the base64 image in {field!r}") from None
        values = value if isinstance(value, list) else [value]
        colours = colours_for(next((sent[name] for name in COLOUR_FIELDS if name in sent), None), len(values))
        try:
            return [(f"{field}[{i}]", base64.b64decode(v, validate=True), colour)
                    for i, (v, colour) in enumerate(zip(values, colours))]
        except (binascii.Error, TypeError, ValueError):
            raise RequestError(400, f"{field!r} is not valid base64") from None
    raise RequestError(415, "send multipart/form-data or application/json")


def create_app(models, max_image_bytes=MAX_IMAGE_BYTES, max_batch=MAX_BATCH, collector=None, per_model_collect=False):
    """models: modelfolder.ModelFolder or OneModel (get, names, describe); collector: a Collector (--collect), which
    gives every answer an id for /feedback, filed under the model's name when per_model_collect (--models)."""
    app = FastAPI(title="captcha reader", docs_url=None, redoc_url=None)

    def chosen(name):
        """The reader for a request: the named model, or the one model served when none is named."""
        names = models.names()
        if name is None:
            if len(names) != 1:
                raise RequestError(400, f"name the model: /read/NAME; serving {', '.join(names) or 'none yet'}")
            name = names[0]
        try:
            return name, models.get(name)
        except KeyError:
            raise RequestError(404, f"no model named {name!r}; serving {', '.join(names) or 'none yet'}") from None

    def decoded(captcha_reader, images):
        """Preprocessed model inputs; an unreadable image fails the request, naming it."""
        arrays = []
        for name, data, colour in images:
            if len(data) > max_image_bytes:
                raise RequestError(413, f"{name}: {len(data)} bytes; the limit is {max_image_bytes} per image")
            try:
                arrays.append(captcha_reader.prepare_encoded(data, name, colour))
            except CaptchaError as e:
                raise RequestError(400, str(e)) from None
        return np.stack(arrays)

    def read(captcha_reader, images):
        return captcha_reader.judge(captcha_reader.predict(decoded(captcha_reader, images)))

    def results(readings, images, model_name):
        answers = []
        for reading, (_, data, _) in zip(readings, images):
            answer = {"text": reading.text, "confidence": float(f"{reading.confidence:.6g}"), "low_confidence": reading.low}
            if reading.expression is not None or reading.reason is not None:  # arithmetic: the value the site asks for
                answer.update(answer=reading.answer, expression=reading.expression)
                if reading.reason is not None:
                    answer["reason"] = reading.reason
            if collector is not None:
                answer["id"] = collector.keep(data, reading.text, model_name if per_model_collect else None)
            answers.append(answer)
        return answers

    @app.exception_handler(RequestError)
    async def request_error(request, error):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/models")
    async def models_info():
        return models.describe()

    @app.get("/model")
    @app.get("/model/{name}")
    async def model_info(name: str | None = None):
        name, captcha_reader = chosen(name)
        meta = captcha_reader.meta
        described = modelfolder.describe_reader(captcha_reader)  # the reader this request holds, whatever comes
        return {"model": described["file"], **described, "name": name, "preprocess": meta["preprocess"],
                "model_config": meta.get("model_config")}

    @app.post("/read")
    @app.post("/read/{name}")
    async def read_one(request: Request, name: str | None = None):
        started = time.perf_counter()
        name, captcha_reader = chosen(name)  # held to the end: a replaced model finishes this request
        images = await images_from(request, "image", max_image_bytes + 4096)  # the form's own bytes too
        if len(images) != 1:
            raise RequestError(400, f"/read takes one image, got {len(images)}; use /read_batch")
        readings = await run_in_threadpool(read, captcha_reader, images)
        return {**results(readings, images, name)[0], "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

    @app.post("/read_batch")
    @app.post("/read_batch/{name}")
    async def read_batch(request: Request, name: str | None = None):
        started = time.perf_counter()
        name, captcha_reader = chosen(name)
        images = await images_from(request, "images", max_batch * (max_image_bytes + 4096))
        if len(images) > max_batch:
            raise RequestError(413, f"{len(images)} images; the limit is {max_batch} per request")
        readings = await run_in_threadpool(read, captcha_reader, images)
        return {"results": results(readings, images, name),
                "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

    @app.post("/feedback")
    async def feedback(request: Request):
        if collector is None:
            raise RequestError(404, "no feedback is collected: start serve.py with --collect DIR")
        try:
            body = json.loads(await read_body(request, 4096))
            token, accepted = body["id"], body["accepted"]
        except (ValueError, KeyError, TypeError):
            raise RequestError(400, 'send JSON {"id": "<an answer\'s id>", "accepted": true or false}') from None
        if not isinstance(token, str) or not isinstance(accepted, bool):
            raise RequestError(400, '"id" is a string and "accepted" true or false')
        path = await run_in_threadpool(collector.file, token, accepted)
        return {"filed": str(path)}

    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    served = parser.add_mutually_exclusive_group()
    served.add_argument("--model", help="a .keras, .onnx or .tflite model (default: saved_model/crnn_ctc_best.keras)")
    served.add_argument("--models", metavar="DIR", help="serve every model file in DIR by its name, following the "
                                                        "folder as files are added, replaced or removed")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (as in Docker)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--allowed", help="read only these symbols (or a preset: digits, lower, upper, ...)")
    parser.add_argument("--case", choices=(*reader.CASES, "keep"),
                        help="fold letter case, for sites that ignore it (default: the model's own fold; keep: none)")
    parser.add_argument("--answer", choices=arithmetic.ANSWERS,
                        help="arithmetic: answer the value of the expression read (default: as the model was trained)")
    parser.add_argument("--min_confidence", type=float,
                        help="answers below it say low_confidence (default: the model's stored threshold; 0: no "
                             "threshold); so do answers of a length no label typed for the model has")
    parser.add_argument("--max_image_bytes", type=int, default=MAX_IMAGE_BYTES)
    parser.add_argument("--max_batch", type=int, default=MAX_BATCH, help="images per /read_batch request")
    parser.add_argument("--collect", metavar="DIR", help="give each answer an id; POST /feedback files its image "
                                                         "under DIR/accepted (labelled) or DIR/rejected (DIR/NAME/... "
                                                         "with --models)")
    parser.add_argument("--collect_max", type=int, default=COLLECT_MAX,
                        help="images kept awaiting feedback; past it the oldest is dropped")
    parser.add_argument("--poll", type=float, default=1.0, help="with --models: seconds between looks at the folder")
    args = parser.parse_args(argv)
    settings = dict(allowed=args.allowed, case=args.case, answer=args.answer, min_confidence=args.min_confidence,
                    warm=True)
    import python_multipart  # noqa: F401  (Starlette imports it on the first form; here, before the port opens)

    try:
        if args.models:
            models = modelfolder.ModelFolder(args.models, settings, log=lambda line: print(line, flush=True))
            models.refresh(settled_only=False)
        else:
            models = modelfolder.OneModel(args.model or "saved_model/crnn_ctc_best.keras", settings)
            print(models.reader.low_rule.description, flush=True)
        collector = Collector(args.collect, args.collect_max) if args.collect else None
    except (CaptchaError, OSError) as e:
        return cli.user_error(e)
    if args.models:
        models.watch(args.poll)
        print(f"serving the models of {args.models} ({', '.join(models.names()) or 'none yet'}) on "
              f"http://{args.host}:{args.port}/read/NAME, following the folder", flush=True)
    else:
        print(f"serving {models.path} ({len(models.reader.charset.symbols)} symbols) on http://{args.host}:{args.port}",
              flush=True)
    if collector:
        print(f"collecting the site's answers: accepted readings to {collector.folder}"
              f"{'/NAME' if args.models else ''}/accepted, rejected to .../rejected", flush=True)
    uvicorn.run(create_app(models, args.max_image_bytes, args.max_batch, collector, per_model_collect=bool(args.models)),
                host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
