"""Teachers: readers whose readings of a site's unlabelled captchas become the first pseudo-labels.

    python train.py --unlabeled captchas/ --teacher ddddocr --check checked/   # no labels but a small check folder
    python train.py --unlabeled captchas/ --teacher other_site.keras           # a model of a similar site
    python test.py --model ddddocr --folder checked/                            # what the teacher reads, scored

A teacher is `ddddocr` (the field's zero-shot reader, an optional package, imported only here and only when
asked for) or any model file this toolkit reads (.keras, .onnx, .tflite). ddddocr reads each image with its two
models (default and beta); a model file reads it once, with its confidence.

Its readings become pseudo-labels through these filters, in this order; each dropped reading is counted by reason:
  1. letter case folded (the site's, from the check labels; else lower: a teacher's case is a guess, and most
     sites ignore it);
  2. agreement: where the teacher has two readers, both read the same text;
  3. length: the lengths of the check labels people typed; with none, the lengths that hold at least
     TYPICAL_LENGTH_SHARE of the agreed readings (the rest are symbols merged or split);
  4. symbols: the check labels' symbols; with none, those in at least TYPICAL_SYMBOL_SHARE of the agreed readings;
  5. confidence: with a check folder, the teacher reads it too, and its readings that pass 1-4 are kept from the
     confidence at which they are right TEACHER_PRECISION of the time (if any is); with none, a model file's
     threshold stored in it, if it stores one.
"""

import dataclasses
from collections import Counter
from pathlib import Path

import arithmetic
import metrics
import charsets
import reader
from errors import CaptchaError

DDDDOCR = "ddddocr"
TYPICAL_LENGTH_SHARE = 0.10
TYPICAL_SYMBOL_SHARE = 0.01
TEACHER_PRECISION = 0.95  # the share of a teacher's kept readings of the check folder that must be right
INSTALL_HINT = "pip install ddddocr"


@dataclasses.dataclass
class TeacherReading:
    path: str
    text: str  # the first (or only) reader's text, as read
    second: str | None = None  # the second reader's text, where the teacher has two
    confidence: float | None = None  # where the teacher gives one


class DdddocrTeacher:
    """ddddocr's default and beta models, each reading every image."""

    name = DDDDOCR
    threshold = None  # ddddocr's confidence is its own: a threshold for it is chosen on a check folder, if any
    readers_described = "ddddocr (its default and beta models; a reading is kept where both agree)"

    def __init__(self):
        try:
            import ddddocr
        except ImportError:
            raise CaptchaError(f"--teacher ddddocr needs the ddddocr package: {INSTALL_HINT}") from None
        self.first = ddddocr.DdddOcr(show_ad=False)
        self.second = ddddocr.DdddOcr(show_ad=False, beta=True)

    def read_paths(self, paths, asked=None):
        """asked {path: colour}: each captcha read through ddddocr's colour filter set to the colour it asks for."""
        asked = asked or {}
        check_ddddocr_colours(asked.values())
        for path in paths:
            colour = ddddocr_colour_filter(asked.get(str(path)))
            try:
                data = Path(path).read_bytes()
                first = self.first.classification(data, probability=True, **colour)
                yield TeacherReading(str(path), first["text"], self.second.classification(data, **colour),
                                     float(first["confidence"]))
            except Exception:  # ddddocr raises PIL's and its own errors for files it cannot decode: nothing read
                yield TeacherReading(str(path), "")


DDDDOCR_COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "cyan", "black", "white", "gray")


def check_ddddocr_colours(colours):
    """ddddocr's colour filter knows its own names only (1.6): refused before any reading, listing them."""
    unknown = sorted(set(colours) - set(DDDDOCR_COLOURS) - {"grey"})
    if unknown:
        raise CaptchaError(f"ddddocr's colour filter does not know the colour {unknown[0]!r}; it knows "
                           f"{', '.join(DDDDOCR_COLOURS)}")


def ddddocr_colour_filter(colour):
    """ddddocr's classification() arguments that keep only the strokes of `colour` (none: every stroke)."""
    if not colour:
        return {}
    return {"color_filter_colors": ["gray" if colour == "grey" else colour]}


class ModelTeacher:
    """A model file of this toolkit's (.keras, .onnx, .tflite), e.g. one trained on a similar site."""

    def __init__(self, path):
        self.reader = reader.Reader(path)
        self.name = str(path)
        stored = (self.reader.meta.get("abstain") or {}).get("threshold")
        self.threshold = stored
        self.readers_described = (f"{path} (readings at or above its stored confidence threshold {stored:.4g})"
                                  if stored is not None else f"{path} (no confidence threshold stored in it)")

    def read_paths(self, paths, asked=None):
        for reading in self.reader.read_paths(list(paths), asked=asked):
            if reading.error:
                yield TeacherReading(reading.path, "")
            else:
                yield TeacherReading(reading.path, reading.text, None, reading.confidence)


def load_teacher(spec):
    """`ddddocr`, or the path of a model file."""
    if spec == DDDDOCR:
        return DdddocrTeacher()
    if not Path(spec).is_file():
        raise CaptchaError(f"--teacher {spec}: neither ddddocr nor a model file (.keras, .onnx, .tflite)")
    return ModelTeacher(spec)


def fold(text, case):
    return charsets.fold_case(text, case) if case in ("lower", "upper") else text


def typical_lengths(texts):
    """The lengths that hold at least TYPICAL_LENGTH_SHARE of `texts` (the commonest always)."""
    counts = Counter(len(text) for text in texts if text)
    if not counts:
        return set()
    total = sum(counts.values())
    return {n for n, c in counts.items() if c >= TYPICAL_LENGTH_SHARE * total} | {counts.most_common(1)[0][0]}


def typical_symbols(texts):
    """The symbols found in at least TYPICAL_SYMBOL_SHARE of `texts` (and in at least two)."""
    counts = Counter(symbol for text in texts for symbol in set(text))
    return {s for s, c in counts.items() if c >= max(2, TYPICAL_SYMBOL_SHARE * len(texts))}


@dataclasses.dataclass
class Filtered:
    """The pseudo-labels a teacher's readings give, and what the filters decided."""

    kept: list  # (path, label)
    dropped: Counter  # reason -> count
    lengths: set
    symbols: set
    case: str

    def describe(self, total):
        lengths = ", ".join(map(str, sorted(self.lengths)))
        reasons = "; ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
        return (f"{len(self.kept)} of {total} readings kept as pseudo-labels (case {self.case}; lengths {lengths}; "
                f"{len(self.symbols)} symbols)" + (f"; dropped: {reasons}" if reasons else ""))


def filter_readings(readings, case="lower", lengths=None, symbols=None, min_confidence=None):
    """The filters of the module's docstring. lengths, symbols: the check labels' (None: typical ones)."""
    folded = [dataclasses.replace(r, text=fold(r.text, case), second=None if r.second is None else fold(r.second, case))
              for r in readings]
    dropped = Counter()
    agreed = []
    for r in folded:
        if not r.text:
            dropped["nothing read"] += 1
        elif r.second is not None and r.second != r.text:
            dropped["the two readers disagree"] += 1
        else:
            agreed.append(r)
    lengths = set(lengths) if lengths else typical_lengths([r.text for r in agreed])
    symbols = set(symbols) if symbols else typical_symbols([r.text for r in agreed])
    kept = []
    for r in agreed:
        if len(r.text) not in lengths:
            dropped["a length the site's labels do not have"] += 1
        elif set(r.text) - symbols:
            dropped["a symbol the site's labels do not use"] += 1
        elif min_confidence is not None and r.confidence is not None and r.confidence < min_confidence:
            dropped["below the teacher's confidence threshold"] += 1
        else:
            kept.append((r.path, r.text))
    return Filtered(kept, dropped, lengths, symbols, case)


def check_threshold(check_readings, truth, case, lengths, symbols):
    """On a check folder (truth {path: label}): how the teacher reads it, and the confidence above which its
    filtered readings are right TEACHER_PRECISION of the time (None: no confidence reaches it, or the teacher gives
    none). Returns (threshold, a line saying what was measured)."""
    filtered = filter_readings(check_readings, case, lengths, symbols)
    exact = sum(fold(r.text, case) == truth[r.path] for r in check_readings)
    right = [truth[path] == label for path, label in filtered.kept]
    line = (f"teacher on the check folder: {exact} of {len(check_readings)} read right; the filters keep "
            f"{len(right)}, {sum(right)} of them right")
    confidence_of = {r.path: r.confidence for r in check_readings}
    confidences = [confidence_of[path] for path, _ in filtered.kept]
    if not right or None in confidences:
        return None, line
    chosen = metrics.abstention_threshold(right, confidences, TEACHER_PRECISION)
    if chosen["threshold"] is None:
        return None, line + f"; no confidence keeps them {TEACHER_PRECISION:.0%} right: no confidence filter"
    kept = round(chosen["coverage"] * len(right))
    return chosen["threshold"], line + (f"; from confidence {chosen['threshold']:.4g} the filters keep {kept}, "
                                        f"{chosen['precision']:.0%} right: that threshold is applied")


class DdddocrReader:
    """ddddocr's default model behind the reader interface test.py uses (test.py --model ddddocr): what the
    teacher reads on a site, scored before any training. It gives no confidence the toolkit calibrates, so no
    reading is marked low by confidence."""

    def __init__(self, case=None, answer=None, min_confidence=None):
        self.path = Path(DDDDOCR)
        self.answer = arithmetic.check_answer(answer or "text")
        self.teacher = DdddocrTeacher()
        self.meta = {"labels": {"rule": "auto"}}  # file names read by the auto rule
        self.charset = None  # any symbol
        self.colours = ()  # it needs no asked colour,
        self.colour_filter = DDDDOCR_COLOURS  # but reads one through its colour filter
        self.case = case if case in ("lower", "upper") else None  # --case folds readings and labels alike
        self.low_rule = self.low_confidence_rule(reader.checked_min_confidence(min_confidence))

    def low_confidence_rule(self, given=None):
        if given is None:
            return reader.LowConfidenceRule(0.0, None, "ddddocr's default model (the teacher): no reading is marked "
                                                       "low (--min_confidence sets a threshold on its confidence)")
        return reader.LowConfidenceRule(given, None, f"ddddocr's default model (the teacher): readings below "
                                                     f"confidence {given:g} are marked low (--min_confidence)")

    def read_paths(self, paths, batch_size=None, debug_dir=None, asked=None):
        """asked {path: colour}: each read through ddddocr's colour filter set to its asked colour."""
        asked = asked or {}
        check_ddddocr_colours(asked.values())
        for path in paths:
            try:
                result = self.teacher.first.classification(Path(path).read_bytes(), probability=True,
                                                           **ddddocr_colour_filter(asked.get(str(path))))
            except Exception as e:  # ddddocr raises PIL's and its own errors for files it cannot decode
                yield reader.FileReading(str(path), error=f"{path}: ddddocr could not read it ({type(e).__name__})")
                continue
            yield reader.FileReading(str(path), fold(result["text"], self.case), float(result["confidence"]))
