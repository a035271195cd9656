"""A labelling page: one captcha at a time, the best reader's guess pre-filled, the least certain first.

    python label.py captchas/ --model saved_model/crnn_ctc_best.keras     # or --teacher ddddocr, or neither
    # open http://127.0.0.1:8010 ; labels go to captchas/labels.csv as you type them
    python train.py --data_dir captchas/ --labels captchas/labels.csv

Keys: type to replace the guess (it is selected); Enter saves and shows the next; ArrowDown skips; ArrowUp goes
back to change an earlier label; Escape puts the guess back. A label with a symbol the model does not know, or of a
length no other label has, is flagged: Enter once more saves it anyway.

Each label is written the moment it is entered (the labels file is replaced whole, atomically), so a killed server
loses nothing, and a restart continues with the images not yet labelled. Skipped images are listed beside it
(labels.skipped.txt) and come last. The readings are computed once and kept beside it too (labels.guesses.json,
reused while the model file is unchanged). Only the folder's own images are served: by their name in the listing,
never by a path. Binds to 127.0.0.1 unless --host says otherwise.
"""

import argparse
import csv
import io
import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path

import cli
from errors import CaptchaError
from imagefiles import list_images

PAGE = Path(__file__).resolve().parent / "web" / "label.html"
RETRAIN_AFTER = 50  # labels before the page offers a retrain: about what a model needs to beat a zero-shot guess
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".bmp": "image/bmp", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}


def images_inside(folder):
    """{name relative to folder: path} of the folder's images whose real path is inside it (a linked image or
    sub-folder that points elsewhere is left out: nothing outside the folder is served)."""
    root = folder.resolve()
    found = {}
    for path in list_images(folder):
        if path.resolve().is_relative_to(root):
            found[path.relative_to(folder).as_posix()] = path
    if not found:
        raise CaptchaError(f"{folder}: no images to label")
    return found


class LabelStore:
    """The labels typed so far ({name: label}), written through to a CSV file `file,label` on every change."""

    def __init__(self, path, names):
        self.path = Path(path)
        self.skipped_path = self.path.with_name(self.path.stem + ".skipped.txt")
        self.lock = threading.Lock()
        self.labels = {}
        if self.path.is_file():
            rows = list(csv.reader(io.StringIO(self.path.read_text(encoding="utf-8-sig"))))
            if rows and rows[0] == ["file", "label"]:
                rows = rows[1:]
            bad = next((i for i, row in enumerate(rows) if len(row) != 2), None)
            if bad is not None:
                raise CaptchaError(f"{self.path}: line {bad + 2} is not a file,label row; give another --out")
            self.labels = {name: label for name, label in rows if name in names}
        self.skipped = set()
        if self.skipped_path.is_file():
            self.skipped = set(self.skipped_path.read_text(encoding="utf-8").split("\n")) & set(names)

    def save(self, name, label):
        with self.lock:
            self.labels[name] = label
            self.skipped.discard(name)
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(["file", "label"])
            writer.writerows(self.labels.items())
            temporary = self.path.with_name(self.path.name + ".writing")
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(text.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)  # a kill leaves the old file or the new one, never half of one

    def skip(self, name):
        with self.lock:
            if name not in self.skipped:
                self.skipped.add(name)
                with open(self.skipped_path, "a", encoding="utf-8") as f:
                    f.write(name + "\n")


def guess_reader(model, teacher, case=None):
    """The reader of guesses (reader.Reader or teacher.DdddocrReader), its description and charset (None: any)."""
    if model:
        import reader

        loaded = reader.Reader.load(model, case=case)
        return loaded, f"the model {model}", loaded.charset.symbols
    if teacher:  # ddddocr (a model file teaches through --model)
        import teacher as teachers

        case = "lower" if case is None else case  # as the teacher's filters fold it: most sites ignore case
        return teachers.DdddocrReader(case), f"ddddocr (the teacher; case {case})", None
    return None, "nothing (no --model or --teacher)", None


def read_guesses(names, paths, model, teacher, cache_path, case=None):
    """{name: [text, confidence]} for every image, read once and cached beside the labels (while the model file is
    the same); empty with no reader."""
    source, described, charset = guess_reader(model, teacher, case)
    if source is None:
        return {}, described, charset
    key = f"{model}:{os.path.getmtime(model)}:{case}" if model else f"{teacher}:{case}"
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text(encoding="utf-8"))
        if cached.get("key") == key and set(cached["guesses"]) >= set(names):
            return cached["guesses"], described, charset
    print(f"reading {len(names)} images with {described} ...", flush=True)
    guesses = {}
    for name, reading in zip(names, source.read_paths([str(paths[n]) for n in names])):
        guesses[name] = [reading.text or "", float(reading.confidence or 0.0)] if not reading.error else ["", 0.0]
    cache_path.write_text(json.dumps({"key": key, "guesses": guesses}, ensure_ascii=False), encoding="utf-8")
    return guesses, described, charset


class Session:
    """The folder, its labels and the guesses; the order the page shows them in."""

    def __init__(self, folder, out, model=None, teacher=None, retrain_after=RETRAIN_AFTER, case=None):
        self.folder, self.out = Path(folder), Path(out)
        self.paths = images_inside(self.folder)
        self.names = list(self.paths)
        self.store = LabelStore(self.out, self.paths)
        self.retrain_after, self.case = retrain_after, case
        self.rerank(model, teacher)

    def rerank(self, model=None, teacher=None):
        if model and not Path(model).is_file():
            raise CaptchaError(f"{model}: no such model file")
        cache = self.out.with_name(self.out.stem + ".guesses.json")
        self.guesses, self.described, self.charset = read_guesses(self.names, self.paths, model, teacher, cache,
                                                                  self.case)
        self.model = model

    def order(self):
        """Images not yet labelled: least confident guess first (file order without guesses), skipped ones last."""
        todo = [n for n in self.names if n not in self.store.labels]
        confidence = {n: self.guesses.get(n, ["", 0.0])[1] for n in todo}
        return sorted(todo, key=lambda n: (n in self.store.skipped, confidence[n] if self.guesses else 0.0))

    def state(self):
        labels = self.store.labels
        symbols = self.charset if self.charset is not None else ("".join(sorted(set("".join(labels.values()))))
                                                                if len(labels) >= 20 else None)
        return {
            "folder": str(self.folder), "out": str(self.out), "total": len(self.names), "labelled": len(labels),
            "reader": self.described, "charset": symbols,
            "lengths": dict(Counter(len(label) for label in labels.values())),
            "queue": [{"name": n, "guess": self.guesses.get(n, ["", 0.0])[0],
                       "confidence": self.guesses.get(n, ["", 0.0])[1]} for n in self.order()],
            "history": [{"name": n, "label": label} for n, label in labels.items()],
            "retrain_after": self.retrain_after,
            "retrain_command": (f"python train.py --data_dir {self.folder} --labels {self.out} "
                                f"--out runs/labelled"),
        }


def create_app(session):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from pydantic import BaseModel

    class Label(BaseModel):
        name: str
        label: str
        keys: int = 0  # keystrokes the page counted for this label

    class Name(BaseModel):
        name: str

    class Rerank(BaseModel):
        model: str

    app = FastAPI(title="captcha labelling", docs_url=None, redoc_url=None)
    typed = {"labels": 0, "keys": 0}

    def known(name):
        if name not in session.paths:
            raise HTTPException(404, f"{name!r} is not an image of {session.folder}")
        return name

    @app.exception_handler(HTTPException)
    async def refused(request, error):
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    @app.get("/")
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/api/state")
    def state():
        return session.state()

    @app.get("/image/{name:path}")
    def image(name: str):
        path = session.paths[known(name)]
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    @app.post("/api/label")
    def label(body: Label):
        text = body.label.strip()
        if not text:
            raise HTTPException(400, "an empty label; skip the image instead")
        session.store.save(known(body.name), text)
        typed["labels"] += 1
        typed["keys"] += body.keys
        labelled = len(session.store.labels)
        if labelled == session.retrain_after:
            print(f"{labelled} labels: retrain with  {session.state()['retrain_command']}", flush=True)
        return {"labelled": labelled, "keys_per_label": typed["keys"] / typed["labels"]}

    @app.post("/api/skip")
    def skip(body: Name):
        session.store.skip(known(body.name))
        return {"skipped": len(session.store.skipped)}

    @app.post("/api/rerank")
    def rerank(body: Rerank):
        try:
            session.rerank(body.model)
        except CaptchaError as e:
            raise HTTPException(400, str(e)) from None
        return session.state()

    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the captchas to label (sub-folders too)")
    guess = parser.add_mutually_exclusive_group()
    guess.add_argument("--model", help="pre-fill with this model's readings (.keras, .onnx, .tflite)")
    guess.add_argument("--teacher", choices=("ddddocr",), help="pre-fill with ddddocr's readings (pip install ddddocr)")
    parser.add_argument("--case", choices=("lower", "upper", "keep"),
                        help="fold the guesses' letter case (default: a model's own fold; lower for ddddocr)")
    parser.add_argument("--out", help="the labels file, CSV file,label (default: FOLDER/labels.csv)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 lets other machines label too")
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--retrain_after", type=int, default=RETRAIN_AFTER,
                        help="labels after which the page offers the retrain command and a re-rank")
    args = parser.parse_args(argv)
    try:
        session = Session(args.folder, args.out or Path(args.folder) / "labels.csv", args.model, args.teacher,
                          args.retrain_after, args.case)
    except CaptchaError as e:
        return cli.user_error(e)
    import uvicorn

    print(f"{session.state()['labelled']} of {len(session.names)} images labelled in {session.out}; guesses from "
          f"{session.described}", flush=True)
    print(f"label at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(session), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
