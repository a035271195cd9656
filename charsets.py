"""The charset: the symbols a model reads, text <-> CTC class indices, the presets, letter-case folds, and the
charset of a set of labels or of a dictionary file."""

import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from errors import CaptchaError

DEFAULT_SYMBOLS = string.ascii_uppercase + string.ascii_lowercase + string.digits  # the reference's order
PAD_LABEL = -1  # fills label rows past a label's end; the CTC loss counts only the rest


@dataclass(frozen=True)
class Charset:
    """The symbols a model can read, and where the CTC blank sits among its output classes.

    Keras' `ops.ctc_loss`/`ctc_decode` expect the blank at index 0 (their `mask_index` default),
    so new models use blank_index=0 and symbol i is class i+1. The reference project's checkpoints
    follow TensorFlow's old convention, blank last (class 62 of 63); `blank_index=len(symbols)`
    describes those.
    """

    symbols: str = DEFAULT_SYMBOLS
    blank_index: int = 0

    def __post_init__(self):
        if not self.symbols:
            raise CaptchaError("charset is empty")
        repeated = sorted(c for c, n in Counter(self.symbols).items() if n > 1)
        if repeated:
            raise CaptchaError(f"charset repeats symbols: {''.join(repeated)!r}")
        if self.blank_index not in (0, len(self.symbols)):
            raise CaptchaError(
                f"blank_index must be 0 (Keras) or {len(self.symbols)} (last); got {self.blank_index}"
            )

    @property
    def num_classes(self):
        return len(self.symbols) + 1

    def _offset(self):
        return 1 if self.blank_index == 0 else 0

    def encode(self, text):
        unknown = self.unknown_symbols(text)
        if unknown:
            raise CaptchaError(f"{text!r} has symbols outside the charset: {unknown!r}")
        return [self.symbols.index(c) + self._offset() for c in text]

    def decode(self, indices):
        """Class indices (blank, padding and out-of-range ones skipped) back to text."""
        offset = self._offset()
        chars = []
        for i in indices:
            i = int(i)
            if i < 0 or i == self.blank_index or i >= self.num_classes:
                continue
            chars.append(self.symbols[i - offset])
        return "".join(chars)

    def unknown_symbols(self, text):
        return "".join(sorted(set(text) - set(self.symbols)))

    def to_dict(self):
        return {"symbols": self.symbols, "blank_index": self.blank_index}

    @classmethod
    def from_dict(cls, d):
        return cls(symbols=d["symbols"], blank_index=int(d["blank_index"]))


CHARSET_PRESETS = {
    "default": DEFAULT_SYMBOLS,
    "digits": string.digits,
    "lower": string.ascii_lowercase,
    "upper": string.ascii_uppercase,
    "lower_digits": string.ascii_lowercase + string.digits,
    "upper_digits": string.ascii_uppercase + string.digits,
}


def fold_case(text, case):
    """`text` in one letter case ("lower", "upper"), or as it is (any other case, None included)."""
    return text.lower() if case == "lower" else text.upper() if case == "upper" else text


def charset_of_labels(labels):
    """The symbols the labels use, in the reference's order (A-Z a-z 0-9) first, then the others sorted."""
    seen = set("".join(labels))
    known = "".join(c for c in DEFAULT_SYMBOLS if c in seen)
    return Charset(known + "".join(sorted(seen - set(known))))


def charset_from_file(path):
    """A dictionary file, one symbol per line (PaddleOCR's and CnOCR's format) -> the symbols, in file order."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise CaptchaError(f"{path}: not UTF-8 text (--charset FILE: one symbol per line)") from None
    symbols = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        if len(line) != 1:
            raise CaptchaError(f"{path}: line {number} holds {line!r}, not one symbol (--charset FILE: one per line)")
        if line in symbols:
            raise CaptchaError(f"{path}: line {number}: {line!r} is listed twice")
        symbols.append(line)
    if not symbols:
        raise CaptchaError(f"{path}: no symbols (--charset FILE: one symbol per line)")
    return "".join(symbols)


def charset_from_arg(value, blank_index="first"):
    """A preset name from CHARSET_PRESETS, a file of one symbol per line, or the literal symbols
    ("0123456789abcdef"). "auto" (the symbols the labels use) is not a set of symbols: charset_for_labels
    resolves it."""
    if value == "auto":
        raise CaptchaError("--charset auto means the symbols the labels use; it is resolved from the labels")
    symbols = charset_from_file(value) if value not in CHARSET_PRESETS and Path(value).is_file() \
        else CHARSET_PRESETS.get(value, value)
    blank = 0 if blank_index == "first" else len(symbols)
    return Charset(symbols, blank)


def charset_for_labels(value, labels):
    """--charset as every script reads it: "auto" is the symbols the labels use, else a preset or the symbols."""
    return charset_of_labels(labels) if value == "auto" else charset_from_arg(value)


def colour_name(name):
    """A colour as the labels file, a flag or a form field wrote it, in the one form models store: trimmed, lower
    case (`Red ` and `red` are one colour; a name in any script is kept as written)."""
    return str(name).strip().casefold()
