"""Serve a trained model over HTTP (FastAPI on uvicorn).

    python serve.py --model saved_model/crnn_ctc_best.onnx --port 8000
    curl -F image=@captcha.png http://127.0.0.1:8000/read
    curl -H 'Content-Type: application/json' -d '{"image": "'$(base64 -w0 captcha.png)'"}' http://127.0.0.1:8000/read

Endpoints (every answer is JSON; a bad request gets a 4xx with {"error": "..."}, never a crash):
  POST /read        one image: a multipart file field `image`, or JSON {"image": "<base64>"}
                    -> {"text", "confidence", "low_confidence", "milliseconds"}
  POST /read_batch  several: multipart fields `images`, or JSON {"images": ["<base64>", ...]}
                    -> {"results": [{"text", "confidence", "low_confidence"}, ...], "milliseconds"}
  GET  /health      -> {"status": "ok"}
  GET  /model       the model's metadata: charset, label length, preprocessing, network, reading settings
low_confidence: the confidence is below the model's stored threshold (or --min_confidence), or the text has a
length no label typed for the model has; a caller should fetch a new captcha instead.

A .keras, .onnx or .tflite model; .onnx (export_safe.py --format onnx) serves without TensorFlow and
reads concurrent requests in parallel. The model reads one blank image before the port opens, so the
first request is not the slow one.
"""

import argparse
import base64
import binascii
import json
import math
import sys
import time

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import reader
from preprocess import CaptchaError

MAX_IMAGE_BYTES = 2_000_000  # a captcha is a few kilobytes; anything this large is not one
MAX_BATCH = 64


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


def create_app(captcha_reader, min_confidence=None, max_image_bytes=MAX_IMAGE_BYTES, max_batch=MAX_BATCH):
    """min_confidence None: the threshold stored in the model (reader.Reader.low_confidence_rule)."""
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

    def results(readings):
        return [{"text": t, "confidence": float(f"{c:.6g}"), "low_confidence": low_rule.is_low(t, c, refit)}
                for t, c, refit in zip(*readings)]

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
                "case": captcha_reader.case,
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
        return {**results(readings)[0], "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

    @app.post("/read_batch")
    async def read_batch(request: Request):
        started = time.perf_counter()
        images = await images_from(request, "images", max_batch * (max_image_bytes + 4096))
        if len(images) > max_batch:
            raise RequestError(413, f"{len(images)} images; the limit is {max_batch} per request")
        inputs = await run_in_threadpool(decoded, images)
        readings = await run_in_threadpool(captcha_reader.predict, inputs)
        return {"results": results(readings), "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

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
    parser.add_argument("--min_confidence", type=float,
                        help="answers below it say low_confidence (default: the model's stored threshold; 0: no "
                             "threshold); so do answers of a length no label typed for the model has")
    parser.add_argument("--max_image_bytes", type=int, default=MAX_IMAGE_BYTES)
    parser.add_argument("--max_batch", type=int, default=MAX_BATCH, help="images per /read_batch request")
    args = parser.parse_args(argv)
    try:
        captcha_reader = reader.Reader(args.model, args.allowed, args.case)
        warm_up(captcha_reader)
    except CaptchaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.model} ({len(captcha_reader.charset.symbols)} symbols) on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(create_app(captcha_reader, args.min_confidence, args.max_image_bytes, args.max_batch),
                host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
