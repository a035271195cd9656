"""Everything between a captcha file on disk and a batch of model input.

One pipeline serves training and inference, so the network sees the same pixels in both:
read -> grayscale -> [auto-crop] -> [invert] -> aspect-preserving resize and pad to 200x50
-> CLAHE -> [strong stroke enhancement] -> scale to [0, 1].

Also here: the charset (text <-> CTC class indices), scanning a folder whose file names are the
labels (`python preprocess.py scan DIR`), the train/val/test split and a streaming batch loader.
The synthetic captcha generators are in synth.py.
"""

import argparse
import math
import re
import string
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

import augment as augment_module  # `augment` is also the loader's option name

IMG_HEIGHT = 50
IMG_WIDTH = 200
DEFAULT_SYMBOLS = string.ascii_uppercase + string.ascii_lowercase + string.digits  # the reference's order
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
PAD_LABEL = -1  # fills label rows past a label's end; the CTC loss counts only the rest
MAX_IMAGE_PIXELS = 40_000_000  # no captcha is this large; refusing it keeps a stray photo from eating memory
CLAHE_CLIP = 2.0
CLAHE_TILES = (8, 8)

# `aB3xQ_12.png` and `aB3xQ-1.png` are duplicates of the label `aB3xQ`.
DUPLICATE_SUFFIX = re.compile(r"[_-]\d+$")


class CaptchaError(Exception):
    """A user-facing problem (bad file, bad folder, bad option): scripts print it as one line."""


class ImageReadError(CaptchaError):
    """An image file that cannot be used; `reason` is its short category for scan summaries."""

    def __init__(self, path, reason, detail=""):
        super().__init__(f"{path}: {reason}{f' ({detail})' if detail else ''}")
        self.reason = reason


# ----------------------------------------------------------------------------- charset


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


def charset_of_labels(labels):
    """The symbols the labels use, in the reference's order (A-Z a-z 0-9) first, then the others sorted."""
    seen = set("".join(labels))
    known = "".join(c for c in DEFAULT_SYMBOLS if c in seen)
    return Charset(known + "".join(sorted(seen - set(known))))


def charset_from_arg(value, blank_index="first"):
    """A preset name from CHARSET_PRESETS, or the literal symbols ("0123456789abcdef")."""
    symbols = CHARSET_PRESETS.get(value, value)
    blank = 0 if blank_index == "first" else len(symbols)
    return Charset(symbols, blank)


# ----------------------------------------------------------------------------- image pipeline


RESIZE_MODES = ("default", "reference", "stretch")


@dataclass(frozen=True)
class PreprocessOptions:
    """Pipeline switches. Saved inside every trained model, so inference repeats training's pixels."""

    height: int = IMG_HEIGHT
    width: int = IMG_WIDTH
    auto_crop: bool = False  # one site's captchas share their layout; a crop that follows noise would not
    force_invert: bool = False
    strong: bool = False
    # "default": sizes rounded, padding with the border's median (the image's own background);
    # "reference": the reference's own arithmetic, sizes truncated, padding with the resized image's mean;
    # "stretch": stretched to height x width, bilinear, as the keras-io captcha example reads images.
    resize: str = "default"
    clahe_clip: float = CLAHE_CLIP  # 0: no CLAHE
    clahe_tiles: tuple = CLAHE_TILES

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise CaptchaError(f"unknown resize mode {self.resize!r}; expected one of {', '.join(RESIZE_MODES)}")

    def to_dict(self):  # as JSON gives it back
        return {**asdict(self), "clahe_tiles": list(self.clahe_tiles)}

    @classmethod
    def from_dict(cls, d):
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        if "clahe_tiles" in d:
            d["clahe_tiles"] = tuple(d["clahe_tiles"])
        return cls(**d)


# The reference's training pipeline: no crop, its resize arithmetic and mean padding, CLAHE 2.0 / 8x8.
REFERENCE_PREPROCESSING = PreprocessOptions(auto_crop=False, resize="reference")


def read_gray(path):
    """Decode any common image file (gray, RGB, RGBA, palette, CMYK, 16-bit) to 8-bit grayscale."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(path, "cannot read file", e.strerror or str(e)) from None
    return decode_gray(data, path)


def decode_gray(data, name):
    """Encoded image bytes (a file's, an upload's) -> 8-bit grayscale; `name` says where they came from."""
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if data.size == 0:
        raise ImageReadError(name, "empty file", "0 bytes")
    # OpenCV fills a cut-off JPEG with gray and carries on; a label on half an image would be wrong.
    if data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:].tobytes():
        raise ImageReadError(name, "truncated image", "JPEG without its end marker")
    image = _decode_with_opencv(data)
    if image is None:
        image = _decode_with_pillow(data)
    if image is None:
        raise ImageReadError(name, "not a readable image", "corrupt, truncated or not an image")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageReadError(name, "image too large",
                             f"{image.shape[1]}x{image.shape[0]}; the limit is {MAX_IMAGE_PIXELS // 10**6} megapixels")
    return image


def _decode_with_opencv(data):
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if image is None or image.size == 0:
        return None
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return image
    if image.shape[2] == 4:  # transparent pixels become white paper, not black
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (image[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)


def _decode_with_pillow(data):
    """Formats OpenCV cannot read (GIF, some palette PNGs)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, im).convert("L"))
    except Exception:  # Pillow raises many types for broken files; all mean "unreadable"
        return None


def _background_level(gray):
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return int(np.median(border))


def auto_crop(gray, margin=3):
    """Crop to the text: the rows and columns holding pixels far from the background level."""
    background = _background_level(gray)
    distance = cv2.absdiff(gray, np.full_like(gray, background))
    threshold, _ = cv2.threshold(distance, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ink = distance > max(threshold, 40)
    ink = cv2.morphologyEx(ink.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0
    rows = np.flatnonzero(ink.sum(axis=1) >= 2)
    cols = np.flatnonzero(ink.sum(axis=0) >= 2)
    if rows.size < 5 or cols.size < 5:  # nothing that looks like text: leave the image alone
        return gray
    top, bottom = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, gray.shape[0])
    left, right = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, gray.shape[1])
    return gray[top:bottom, left:right]


def resize_and_pad(gray, height=IMG_HEIGHT, width=IMG_WIDTH, mode="default"):
    """Fit inside height x width keeping the aspect ratio (cubic when enlarging, area when shrinking),
    centred. mode "default": sizes rounded, padded with the image's own background (its border's
    median); "reference": sizes truncated and padded with the resized image's mean, as the
    reference did; "stretch": the whole image stretched to height x width (bilinear), no padding."""
    if mode == "stretch":
        return cv2.resize(gray, (width, height), interpolation=cv2.INTER_LINEAR)
    h, w = gray.shape
    scale = min(width / w, height / h)
    size = int if mode == "reference" else round
    new_w, new_h = max(1, size(w * scale)), max(1, size(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(gray, (new_w, new_h), interpolation=interpolation)
    fill = int(resized.mean()) if mode == "reference" else _background_level(gray)
    canvas = np.full((height, width), fill, dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def preprocess_gray(gray, options=PreprocessOptions(), stages=None, augmentation=None):
    """8-bit grayscale image -> float32 (height, width, 1) in [0, 1].

    Pass a dict as `stages` to collect every intermediate 8-bit image (for --save_debug).
    `augmentation` (training only) alters the resized canvas: a function of one 8-bit image.
    """
    def keep(name, image):
        if stages is not None:
            stages[name] = image

    keep("0_gray", gray)
    if options.auto_crop:
        gray = auto_crop(gray)
        keep("1_crop", gray)
    if options.force_invert:
        gray = 255 - gray
        keep("2_invert", gray)
    gray = resize_and_pad(gray, options.height, options.width, options.resize)
    keep("3_resize_pad", gray)
    if augmentation is not None:
        gray = augmentation(gray)
        keep("3a_augment", gray)
    if options.clahe_clip:
        gray = cv2.createCLAHE(clipLimit=options.clahe_clip, tileGridSize=tuple(options.clahe_tiles)).apply(gray)
        keep("4_clahe", gray)
    if options.strong:  # thin strokes: grow dark ink by a pixel so the early convolutions see it
        gray = cv2.erode(gray, np.ones((2, 2), np.uint8))
        keep("5_strong", gray)
    return (gray.astype(np.float32) / 255.0)[:, :, np.newaxis]


def load_image(path, options=PreprocessOptions(), augmentation=None):
    return preprocess_gray(read_gray(path), options, augmentation=augmentation)


# ----------------------------------------------------------------------------- datasets


def label_from_filename(path):
    """`aB3xQ.png` -> 'aB3xQ'; `aB3xQ_12.png` / `aB3xQ-1.png` (duplicates) -> 'aB3xQ'."""
    return DUPLICATE_SUFFIX.sub("", Path(path).stem)


def list_images(folder):
    """Image files under `folder` (sub-folders too), sorted so every run sees the same order."""
    folder = Path(folder)
    if not folder.exists():
        raise CaptchaError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise CaptchaError(f"{folder}: not a folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@dataclass
class ScanResult:
    samples: list  # (path, label) pairs that passed every check
    skipped: dict = field(default_factory=dict)  # reason -> [paths]

    def summary(self):
        counts = ", ".join(f"{len(paths)} {reason}" for reason, paths in sorted(self.skipped.items()))
        return f"{len(self.samples)} usable images" + (f"; skipped {counts}" if counts else "")


def _check_readable(path):
    try:
        read_gray(path)
    except ImageReadError as e:
        return e.reason
    return None


def scan_folder(folder, charset=None, max_len=None, verify=True, workers=4):
    """Find labelled captchas in `folder`, skipping (and counting by reason) those that can't train.

    charset=None accepts any symbols; max_len=None accepts any length. verify=True decodes every
    image once, so a corrupt file is reported here rather than crashing a training epoch.
    """
    samples, skipped = [], {}
    candidates = []
    for path in list_images(folder):
        label = label_from_filename(path)
        if not label:
            reason = "empty label"
        elif charset is not None and charset.unknown_symbols(label):
            reason = "symbols outside the charset"
        elif max_len is not None and len(label) > max_len:
            reason = f"labels longer than {max_len}"
        else:
            candidates.append((str(path), label))
            continue
        skipped.setdefault(reason, []).append(str(path))
    if verify and candidates:
        with ThreadPoolExecutor(workers) as pool:  # OpenCV decodes outside the GIL
            problems = list(pool.map(_check_readable, [p for p, _ in candidates]))
    else:
        problems = [None] * len(candidates)
    for (path, label), problem in zip(candidates, problems):
        if problem:
            skipped.setdefault(problem, []).append(path)
        else:
            samples.append((path, label))
    return ScanResult(samples, skipped)


def split_samples(samples, val_fraction=0.1, test_fraction=0.1, seed=42):
    """Fixed-seed train/val/test split (scikit-learn) by label: every image of a label (`aB3xQ.png`,
    `aB3xQ_1.png`) lands on the same side, so the test split never holds a copy of a training image.
    Each part keeps at least one label."""
    from sklearn.model_selection import train_test_split

    labels = sorted({label for _, label in samples})
    if len(labels) < 3:
        raise CaptchaError(f"need at least 3 different labels to split train/val/test, found {len(labels)}")
    n_test = max(1, round(len(labels) * test_fraction))
    n_val = max(1, round(len(labels) * val_fraction))
    rest, test = train_test_split(labels, test_size=n_test, random_state=seed)
    train, val = train_test_split(rest, test_size=n_val, random_state=seed)
    part_of = {label: part for part, chosen in enumerate([train, val, test]) for label in chosen}
    return tuple([s for s in samples if part_of[s[1]] == part] for part in range(3))


def encode_labels(labels, charset, max_len):
    """Labels -> int32 (batch, max_len), padded with PAD_LABEL."""
    rows = np.full((len(labels), max_len), PAD_LABEL, dtype=np.int32)
    for i, label in enumerate(labels):
        indices = charset.encode(label)
        rows[i, : len(indices)] = indices
    return rows


class CaptchaBatches:
    """Streams (images, labels) batches from disk: memory stays flat however large the folder.

    Built by `make_batches`, which mixes in keras.utils.PyDataset so Keras can prefetch batches on
    worker threads while the model trains. With `augment` ("light", "strong"; training only) each
    image is altered by augment.augment with a generator drawn from (seed, epoch, position in the
    epoch): different every epoch, the same in every rerun, whichever worker thread loads it.
    `repeats` > 1 passes over the samples that many times per epoch (each pass altered anew), so a
    small folder's epoch is long enough that validation and checkpoints stay a small part of it.
    `augment_epochs`: only the epochs before this one are altered (None: every epoch); the epoch is
    the loader's own count, so prefetching workers and a resumed run agree on it.
    """

    def __init__(self, samples, charset, max_len, options=PreprocessOptions(), batch_size=64,
                 shuffle=False, seed=0, augment="none", repeats=1, augment_epochs=None, **pydataset_kwargs):
        super().__init__(**pydataset_kwargs)
        if augment not in augment_module.CHOICES:
            raise CaptchaError(f"unknown augmentation {augment!r}; choose from {', '.join(augment_module.CHOICES)}")
        self.augment = augment
        self.augment_epochs = augment_epochs
        self.seed = seed
        self.epoch = 0  # on_epoch_end counts it; a resumed run sets it to the epochs already done
        self.paths = [p for p, _ in samples]
        self.labels = encode_labels([label for _, label in samples], charset, max_len)
        self.options = options
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.order = np.tile(np.arange(len(self.paths)), repeats)
        if shuffle:
            self.rng.shuffle(self.order)

    def __len__(self):
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index):
        start = index * self.batch_size
        rows = self.order[start : start + self.batch_size]
        images = np.stack([load_image(self.paths[i], self.options, self._augmentation(start + k))
                           for k, i in enumerate(rows)])
        return images, self.labels[rows]

    def _augmentation(self, position):
        if self.augment == "none" or (self.augment_epochs is not None and self.epoch >= self.augment_epochs):
            return None
        rng = np.random.default_rng([self.seed, self.epoch, position])
        return lambda gray: augment_module.augment(gray, self.augment, rng)

    def on_epoch_end(self):
        self.epoch += 1
        if self.shuffle:
            self.rng.shuffle(self.order)


def make_batches(samples, charset, max_len, options=PreprocessOptions(), batch_size=64, shuffle=False,
                 seed=0, workers=2, augment="none", repeats=1, augment_epochs=None):
    import keras  # here, not at the top: `synth.py` and `preprocess.py scan` start without TensorFlow

    batches_class = type("CaptchaPyDataset", (CaptchaBatches, keras.utils.PyDataset), {})
    return batches_class(samples, charset, max_len, options, batch_size, shuffle, seed, augment, repeats,
                         augment_epochs, workers=workers, use_multiprocessing=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check a folder before training: its usable and skipped images.")
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="count the usable and skipped images of a folder")
    scan.add_argument("folder")
    scan.add_argument("--charset", default="default")
    scan.add_argument("--max_len", type=int, default=0, help="longest label accepted (0: any)")
    scan.add_argument("--verbose", action="store_true", help="list every skipped file")
    args = parser.parse_args(argv)
    try:
        result = scan_folder(args.folder, charset_from_arg(args.charset), args.max_len or None)
    except CaptchaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.verbose:
        for reason, paths in sorted(result.skipped.items()):
            for path in paths:
                print(f"skipped ({reason}): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
