"""Serve a trained model over HTTP (FastAPI on uvicorn).

    python serve.py --model saved_model/crnn_ctc_best.onnx --port 8000
    curl -F image=@captcha.png http://127.0.0.1:8000/read
    curl -H 'Content-Type: application/json' -d '{"image": "'$(base64 -w0 captcha.png)'"}' http://127.0.0.1:8000/read

Endpoints (every answer is JSON; a bad request gets a 4xx with {"error": "..."}, never a crash):
  POST /read        one image: a multipart file field `image`, or JSON {"image": "<base64>"}
                    -> {"text", "confidence", "low_confidence", "milliseconds"}; with --answer arithmetic (or a
                    model trained with it) also "answer" (the value, or null and a "reason") and "expression"
  POST /read_batch  several: multipart fields `images`, or JSON {"images": ["<base64>", ...]}
                    -> {"results": [{"text", "confidence", "low_confidence"}, ...], "milliseconds"}
  POST /feedback    with --collect: {"id": "<an answer's id>", "accepted": true|false}, what the site said of a
                    reading -> {"filed": "<path>"}; an unknown id gets 404, one filed before 409
  GET  /health      -> {"status": "ok"}
  GET  /model       the model's metadata: charset, label length, preprocessing, network, reading settings
low_confidence: the confidence is below the model's stored threshold (or --min_confidence), or the text has a
length no label typed for the model has; a caller should fetch a new captcha instead.

With --collect DIR every answer carries an "id", and the image is kept (in memory, the newest --collect_max;
the oldest is dropped) until its feedback files it: a reading the site accepted is a label, so the image goes to
DIR/accepted/ named LABEL_ID.png (LABEL_md5 names: `train.py --data_dir DIR/accepted` reads them; every accepted
label is also in DIR/accepted/labels.csv, for labels that cannot be file names, e.g. `3*4=?`); a rejected one goes
to DIR/rejected/, its wrong reading in DIR/rejected/readings.csv, for the labelling page (label.py).

A .keras, .onnx or .tflite model; .onnx (export_safe.py --format onnx) serves without TensorFlow and
reads concurrent requests in parallel. The model reads one blank image before the port opens, so the
first request is not the slow one.
"""

import argparse
import base64
import binascii
import csv
import json
import math
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

import arithmetic
import labels
import reader
from preprocess import CaptchaError

MAX_IMAGE_BYTES = 2_000_000  # a captcha is a few kilobytes; anything this large is not one
MAX_BATCH = 64
COLLECT_MAX = 10_000  # images kept awaiting feedback: a few kilobytes each
UNSAFE_IN_NAMES = re.compile(r'[\x00-\x1f/\\:*?"<>|_]|^[.-]|[. ]$')  # and "_", which separates the id
IMAGE_SIGNATURES = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"BM": ".bmp", b"RIFF": ".webp"}


class Collector:
    """Images read, kept under an unguessable id until the caller says whether the site accepted the reading; then
    filed under DIR/accepted (a labelled image) or DIR/rejected. Bounded: past `limit` the oldest is dropped."""

    def __init__(self, folder, limit=COLLECT_MAX):
        self.accepted, self.rejected = Path(folder) / "accepted", Path(folder) / "rejected"
        self.accepted.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.waiting = OrderedDict()  # id -> (image bytes, reading)
        self.filed = deque(maxlen=limit)  # ids already answered, to tell a repeat from an unknown id
        self.filed_set = set()
        self.lock = threading.Lock()

    def keep(self, data, text):
        token = secrets.token_hex(16)
        with self.lock:
            self.waiting[token] = (data, text)
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
            data, text = self.waiting.pop(token)
            if len(self.filed) == self.filed.maxlen:
                self.filed_set.discard(self.filed[0])
            self.filed.append(token)
            self.filed_set.add(token)
            extension = next((e for sig, e in IMAGE_SIGNATURES.items() if data.startswith(sig)), ".png")
            if accepted:
                name = f"{text}_{token}{extension}" if text and not UNSAFE_IN_NAMES.search(text) else \
                    f"{token}{extension}"
                path, table = self.accepted / name, self.accepted / "labels.csv"
            else:
                path, table = self.rejected / f"{token}{extension}", self.rejected / labels.REJECTED_READINGS_NAME
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


async def images_from(request, field, limit):
    """[(name, encoded image bytes)] from a multipart form (files in `field`) or JSON ({field: base64 or list})."""
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
        return [(u.filename or f"{field}[{i}]", await u.read()) for i, u in enumerate(uploads)]
    if content_type.startswith("application/json"):
        try:
            value = json.loads(body)[field]
        except (ValueError, KeyError, TypeError):
            raise RequestError(400, f"send JSON with the base64 image in {field!r}") from None
        values = value if isinstance(value, list) else [value]
        try:
            return [(f"{field}[{i}]", base64.b64decode(v, validate=True)) for i, v in enumerate(values)]
        except (binascii.Error, TypeError, ValueError):
            raise RequestError(400, f"{field!r} is not valid base64") from None
    raise RequestError(415, "send multipart/form-data or application/json")


def create_app(captcha_reader, min_confidence=None, max_image_bytes=MAX_IMAGE_BYTES, max_batch=MAX_BATCH,
               collector=None):
    """min_confidence None: the threshold stored in the model (reader.Reader.low_confidence_rule); collector: a
    Collector (--collect), which gives every answer an id for /feedback."""
    low_rule = captcha_reader.low_confidence_rule(min_confidence)
    print(low_rule.description, flush=True)
    app = FastAPI(title="captcha reader", docs_url=None, redoc_url=None)

    def decoded(images):
        """Preprocessed model inputs; an unreadable image fails the request, naming it."""
        arrays = []
        for name, data in images:
            if len(data) > max_image_bytes:
                raise RequestError(413, f"{name}: {len(data)} bytes; the limit is {max_image_bytes} per image")
            try:
                arrays.append(captcha_reader.prepare_encoded(data, name))
            except CaptchaError as e:
                raise RequestError(400, str(e)) from None
        return np.stack(arrays)

    def results(readings, images):
        answers = [{"text": t, "confidence": float(f"{c:.6g}"), "low_confidence": low_rule.is_low(t, c, refit)}
                   for t, c, refit in zip(*readings)]
        if captcha_reader.answer == "arithmetic":  # the value the site asks for, or why there is none
            for answer in answers:
                value = arithmetic.answer(answer["text"])
                answer.update(answer=value.value, expression=value.expression)
                if value.value is None:
                    answer.update(low_confidence=True, reason=value.error)
        if collector is not None:
            for answer, (_, data) in zip(answers, images):
                answer["id"] = collector.keep(data, answer["text"])
        return answers

    @app.exception_handler(RequestError)
    async def request_error(request, error):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/model")
    async def model_info():
        meta = captcha_reader.meta
        return {"model": captcha_reader.path.name, "format": captcha_reader.path.suffix.lstrip("."),
                "charset": meta["charset"], "max_len": meta.get("max_len"), "preprocess": meta["preprocess"],
                "model_config": meta.get("model_config"), "allowed": captcha_reader.allowed,
                "case": captcha_reader.case, "answer": captcha_reader.answer,
                "min_confidence": low_rule.threshold if math.isfinite(low_rule.threshold) else None,
                "label_lengths": low_rule.lengths}

    @app.post("/read")
    async def read_one(request: Request):
        started = time.perf_counter()
        images = await images_from(request, "image", max_image_bytes + 4096)  # the form's own bytes too
        if len(images) != 1:
            raise RequestError(400, f"/read takes one image, got {len(images)}; use /read_batch")
        inputs = await run_in_threadpool(decoded, images)
        readings = await run_in_threadpool(captcha_reader.predict, inputs)
        return {**results(readings, images)[0], "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

    @app.post("/read_batch")
    async def read_batch(request: Request):
        started = time.perf_counter()
        images = await images_from(request, "images", max_batch * (max_image_bytes + 4096))
        if len(images) > max_batch:
            raise RequestError(413, f"{len(images)} images; the limit is {max_batch} per request")
        inputs = await run_in_threadpool(decoded, images)
        readings = await run_in_threadpool(captcha_reader.predict, inputs)
        return {"results": results(readings, images), "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

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


def warm_up(captcha_reader):
    """One whole request's work before the port opens: decoding, preprocessing, the network, and the
    multipart parser's import, so the first caller waits no longer than the next."""
    import cv2
    import python_multipart  # noqa: F401  (Starlette imports it on the first form it parses)

    blank = cv2.imencode(".png", np.full((50, 200), 255, np.uint8))[1].tobytes()
    captcha_reader.predict(captcha_reader.prepare_encoded(blank, "warm-up")[np.newaxis])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="saved_model/crnn_ctc_best.keras", help="a .keras, .onnx or .tflite model")
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
                                                         "under DIR/accepted (labelled) or DIR/rejected")
    parser.add_argument("--collect_max", type=int, default=COLLECT_MAX,
                        help="images kept awaiting feedback; past it the oldest is dropped")
    args = parser.parse_args(argv)
    try:
        captcha_reader = reader.Reader(args.model, args.allowed, args.case, answer=args.answer)
        warm_up(captcha_reader)
        collector = Collector(args.collect, args.collect_max) if args.collect else None
    except (CaptchaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.model} ({len(captcha_reader.charset.symbols)} symbols) on http://{args.host}:{args.port}",
          flush=True)
    if collector:
        print(f"collecting the site's answers: accepted readings to {collector.accepted}, rejected to "
              f"{collector.rejected}", flush=True)
    uvicorn.run(create_app(captcha_reader, args.min_confidence, args.max_image_bytes, args.max_batch, collector),
                host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
