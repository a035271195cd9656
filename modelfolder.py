"""A folder of models, each read by its name, kept in step with the folder while a server runs (serve.py --models).

    models = ModelFolder("models/", settings={"min_confidence": None})
    models.refresh()               # one look at the folder; serve.py looks every second (watch)
    models.get("site-a").read(image_bytes)

A model's name is its file name without the suffix: `site-a.onnx` is served as `site-a`. A name with several files
is read from its .keras file (through its ONNX twin while that is the same model, so without TensorFlow), else its
.onnx, else its .tflite (with its .tflite.json metadata). Names come from the folder's listing only, so no name a
caller sends can reach a path outside the folder.

Adding, replacing or removing a file takes effect at the next look, with no failed request:
- a file is loaded only when it has looked the same (size, modification time, inode) at two looks in a row, so a
  file still being copied in is never half-loaded; a rename into the folder (what train.py and export_safe.py do)
  is complete at once and is loaded at the next look but one;
- a reader is swapped in whole, so a request that took the old one finishes on it;
- a file that does not load (corrupt, unsafe, not a model) is refused in one logged line naming it; a name that
  was serving keeps its last good model, and `describe()` says why the new file was refused.
Files whose names start with "." or end in .tmp/.part (copies in progress) are passed over.
"""

import dataclasses
import threading
import time
from pathlib import Path

import reader
from modelmeta import tflite_meta_path
from errors import CaptchaError

MODEL_SUFFIXES = (".keras", ".onnx", ".tflite")  # the first a name has is the one read
IN_PROGRESS_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")


@dataclasses.dataclass(frozen=True)
class Served:
    """A name's reader (its `path` is the file it was read from) and the files' signature when it was read."""

    reader: reader.Reader
    signature: tuple


def model_files(folder):
    """{name: the files it has, in MODEL_SUFFIXES order} for the model files directly in `folder`."""
    names = {}
    for path in sorted(Path(folder).iterdir()):
        name = path.name
        if name.startswith(".") or name.lower().endswith(IN_PROGRESS_SUFFIXES) or not path.is_file():
            continue
        if path.suffix.lower() in MODEL_SUFFIXES:
            names.setdefault(path.stem, []).append(path)
    return {name: sorted(paths, key=lambda p: MODEL_SUFFIXES.index(p.suffix.lower())) for name, paths in names.items()}


def signature(paths):
    """What changes when any file a name reads from is written or replaced: sizes, times and inodes, the
    .tflite's metadata file included."""
    looked = []
    for path in paths:
        for file in (path, tflite_meta_path(path)) if path.suffix.lower() == ".tflite" else (path,):
            try:
                stat = file.stat()
            except FileNotFoundError:
                looked.append((file.name, None))
                continue
            looked.append((file.name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(looked)


class ModelFolder:
    """The models of `folder` by name. settings: reader.Reader's keyword settings, the same for every model.
    log: where the one-line decisions go (loaded, replaced, removed, refused)."""

    def __init__(self, folder, settings=None, log=print):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CaptchaError(f"{self.folder}: models folder does not exist")
        self.settings = settings or {}
        self.log = log
        self.served = {}  # name -> Served; replaced whole, never changed in place
        self.refused = {}  # name -> why its file is not served
        self.last_look = {}  # name -> signature at the last look: loaded once two looks agree
        self.lock = threading.Lock()  # one look at a time

    def names(self):
        return sorted(self.served)

    def get(self, name):
        """The reader serving `name`; KeyError for a name the folder does not serve."""
        return self.served[name].reader

    def refresh(self, settled_only=True):
        """One look at the folder: loads new and changed files that have settled (looked the same at the last look;
        settled_only False, at start: every file), drops removed ones. The name tables are replaced, not changed in
        place, so requests and GET /models read them while a look loads a model."""
        with self.lock:
            found = model_files(self.folder)
            served = {name: entry for name, entry in self.served.items() if name in found}
            refused = {name: entry for name, entry in self.refused.items() if name in found}
            for name in set(self.served) - set(served):
                self.log(f"{name}: its file is gone from {self.folder}; no longer served")
            looked = {name: signature(paths) for name, paths in found.items()}
            for name, paths in found.items():
                current = looked[name]
                if settled_only and self.last_look.get(name) != current:
                    continue  # new or still changing: loaded once it looks the same twice
                if (name in served and served[name].signature == current) or refused.get(name, (None,))[0] == current:
                    continue  # loaded, or refused, as it is
                try:
                    served[name] = Served(reader.Reader.load(paths[0], **self.settings), current)
                except Exception as e:  # whatever a broken file makes a loader raise, the other models keep serving
                    why = str(e) if isinstance(e, CaptchaError) else \
                        f"{paths[0]}: not a readable model ({type(e).__name__}: {e})"
                    refused[name] = (current, why)
                    self.log(f"refused: {why}"
                             + (" (the model loaded before keeps serving)" if name in served else ""))
                    continue
                refused.pop(name, None)
                self.log(f"{'replaced' if name in self.served else 'serving'} {name} from {paths[0].name} "
                         f"({len(served[name].reader.charset.symbols)} symbols)")
            self.served, self.refused, self.last_look = served, refused, looked

    def describe(self):
        """{"models": {name: what it reads}, "refused": {name: why}} for GET /models."""
        served = sorted(self.served.items())
        return {"models": {name: describe_reader(entry.reader) for name, entry in served},
                "refused": {name: why for name, (_, why) in sorted(self.refused.items())}}

    def watch(self, interval=1.0):
        """Looks at the folder every `interval` seconds, in a daemon thread, for as long as the process runs."""
        def loop():
            while True:
                time.sleep(interval)
                try:
                    self.refresh()
                except OSError as e:  # the folder itself unmounted or unreadable for a moment
                    self.log(f"{self.folder}: could not look at it ({e}); trying again")

        thread = threading.Thread(target=loop, name="model-folder", daemon=True)
        thread.start()
        return thread


def describe_reader(captcha_reader):
    """A model as GET /models and GET /model show it: its file, charset, kind and threshold."""
    rule, path = captcha_reader.low_rule, captcha_reader.path
    return {"file": path.name, "format": path.suffix.lstrip("."), "charset": captcha_reader.meta["charset"],
            "answer": captcha_reader.answer, "case": captcha_reader.case, "allowed": captcha_reader.allowed,
            "max_len": captcha_reader.meta.get("max_len"),
            "min_confidence": rule.threshold if rule.threshold != float("inf") else None,
            "label_lengths": rule.lengths, "colours": list(captcha_reader.colours)}


class OneModel:
    """One model file served as it was at start (serve.py --model FILE), behind ModelFolder's interface."""

    def __init__(self, path, settings=None):
        self.path = Path(path)
        self.reader = reader.Reader.load(self.path, **(settings or {}))
        self.name = self.path.stem

    def names(self):
        return [self.name]

    def get(self, name):
        if name != self.name:
            raise KeyError(name)
        return self.reader

    def describe(self):
        return {"models": {self.name: describe_reader(self.reader)}, "refused": {}}
