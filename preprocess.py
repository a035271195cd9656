"""The pixels: everything between a captcha file on disk and one image of model input.

One pipeline serves training and inference, so the network sees the same pixels in both:
read -> grayscale (or colour, channels=3) -> [auto-crop] -> [invert] -> aspect-preserving resize
and pad to the canvas (200x50 by default) -> CLAHE -> [strong stroke enhancement] -> scale to [0, 1].

Also here: the charset (text <-> CTC class indices) and listing a folder's images. Where labels come
from is labels.py; the folder scan, the split and the batch loader are dataset.py; the synthetic
captcha generators are synth.py.
"""

import os
import string
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

IMG_HEIGHT = 50
IMG_WIDTH = 200
DEFAULT_SYMBOLS = string.ascii_uppercase + string.ascii_lowercase + string.digits  # the reference's order
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
PAD_LABEL = -1  # fills label rows past a label's end; the CTC loss counts only the rest
MAX_IMAGE_PIXELS = 40_000_000  # no captcha is this large; refusing it keeps a stray photo from eating memory
CLAHE_CLIP = 2.0
CLAHE_TILES = (8, 8)
CHANNELS = (1, 3)  # gray, or colour (B, G, R as OpenCV decodes it)


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


def list_images(folder):
    """Image files under `folder` (sub-folders too, linked ones included), sorted so every run sees the same order."""
    folder = Path(folder)
    if not folder.exists():
        raise CaptchaError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise CaptchaError(f"{folder}: not a folder")
    found, visited = [], set()
    for root, subfolders, files in os.walk(folder, followlinks=True):  # rglob skips linked sub-folders
        real = os.path.realpath(root)
        if real in visited:  # a link back up the tree, or a second link to one folder: listed once
            subfolders[:] = []
            continue
        visited.add(real)
        found += [Path(root) / name for name in files if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


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
    channels: int = 1  # 1: gray; 3: colour, for sites whose text and clutter differ in colour more than in shade

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise CaptchaError(f"unknown resize mode {self.resize!r}; expected one of {', '.join(RESIZE_MODES)}")
        if self.channels not in CHANNELS:
            raise CaptchaError(f"--channels {self.channels}: 1 (gray) or 3 (colour)")

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


def read_image(path, channels=1):
    """Decode any common image file (gray, RGB, RGBA, palette, CMYK, 16-bit) to 8-bit gray (H, W) or,
    with channels=3, 8-bit colour (H, W, 3) in OpenCV's B, G, R order."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(path, "cannot read file", e.strerror or str(e)) from None
    return decode_image(data, path, channels)


def read_gray(path):
    return read_image(path, 1)


def decode_image(data, name, channels=1):
    """Encoded image bytes (a file's, an upload's) -> 8-bit gray or colour; `name` says where they came from."""
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if data.size == 0:
        raise ImageReadError(name, "empty file", "0 bytes")
    # OpenCV fills a cut-off JPEG with gray and carries on; a label on half an image would be wrong.
    if data[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:].tobytes():
        raise ImageReadError(name, "truncated image", "JPEG without its end marker")
    image = _decode_with_opencv(data, channels)
    if image is None:
        image = _decode_with_pillow(data, channels)
    if image is None:
        raise ImageReadError(name, "not a readable image", "corrupt, truncated or not an image")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageReadError(name, "image too large",
                             f"{image.shape[1]}x{image.shape[0]}; the limit is {MAX_IMAGE_PIXELS // 10**6} megapixels")
    return image


def decode_gray(data, name):
    return decode_image(data, name, 1)


def _decode_with_opencv(data, channels):
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
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image if channels == 1 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:  # transparent pixels become white paper, not black
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (image[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    image = np.ascontiguousarray(image[:, :, :3])
    return image if channels == 3 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _decode_with_pillow(data, channels):
    """Formats OpenCV cannot read (GIF, some palette PNGs)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            flat = Image.alpha_composite(white, im)
            if channels == 1:
                return np.asarray(flat.convert("L"))
            return np.ascontiguousarray(np.asarray(flat.convert("RGB"))[:, :, ::-1])  # RGB -> OpenCV's BGR
    except Exception:  # Pillow raises many types for broken files; all mean "unreadable"
        return None


def to_gray(image):
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _background_level(image):
    """The border's median: one gray level, or one level per colour channel."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    if image.ndim == 2:
        return int(np.median(border))
    return tuple(int(v) for v in np.median(border, axis=0))


def auto_crop(image, margin=3):
    """Crop to the text: the rows and columns holding pixels far from the background level (found on
    the gray image; a colour image is cut at the same rows and columns)."""
    gray = to_gray(image)
    background = _background_level(gray)
    distance = cv2.absdiff(gray, np.full_like(gray, background))
    threshold, _ = cv2.threshold(distance, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ink = distance > max(threshold, 40)
    ink = cv2.morphologyEx(ink.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0
    rows = np.flatnonzero(ink.sum(axis=1) >= 2)
    cols = np.flatnonzero(ink.sum(axis=0) >= 2)
    if rows.size < 5 or cols.size < 5:  # nothing that looks like text: leave the image alone
        return image
    top, bottom = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, gray.shape[0])
    left, right = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, gray.shape[1])
    return image[top:bottom, left:right]


def resize_and_pad(image, height=IMG_HEIGHT, width=IMG_WIDTH, mode="default"):
    """Fit inside height x width keeping the aspect ratio (cubic when enlarging, area when shrinking),
    centred. mode "default": sizes rounded, padded with the image's own background (its border's
    median); "reference": sizes truncated and padded with the resized image's mean, as the
    reference did; "stretch": the whole image stretched to height x width (bilinear), no padding."""
    if mode == "stretch":
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    size = int if mode == "reference" else round
    new_w, new_h = max(1, size(w * scale)), max(1, size(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if mode == "reference":
        fill = int(resized.mean()) if resized.ndim == 2 else tuple(int(v) for v in resized.mean(axis=(0, 1)))
    else:
        fill = _background_level(image)
    canvas = np.full((height, width) + resized.shape[2:], fill, dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def equalize(image, clip, tiles):
    """CLAHE: on the gray image, or on a colour image's lightness (LAB's L), leaving its hues as they are."""
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=tuple(tiles))
    if image.ndim == 2:
        return clahe.apply(image)
    lab = cv2.cvtColor(image, cv2.COLOR_BGR2LAB)
    lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)


def make_canvas(image, options=PreprocessOptions(), stages=None):
    """The first stages: 8-bit image (gray (H, W) or colour (H, W, 3), as read_image gives for
    options.channels) -> [auto-crop] -> [invert] -> resize-and-pad: the 8-bit canvas (height, width[, 3]).
    It is the same every epoch, so the training loader keeps it in memory where it fits."""
    def keep(name, stage):
        if stages is not None:
            stages[name] = stage

    expected = 2 if options.channels == 1 else 3
    if image.ndim != expected:
        raise CaptchaError(f"a {'gray' if image.ndim == 2 else 'colour'} image for a model that reads "
                           f"{'gray' if options.channels == 1 else 'colour'} (channels {options.channels})")
    keep("0_gray" if image.ndim == 2 else "0_colour", image)
    if options.auto_crop:
        image = auto_crop(image)
        keep("1_crop", image)
    if options.force_invert:
        image = 255 - image
        keep("2_invert", image)
    image = resize_and_pad(image, options.height, options.width, options.resize)
    keep("3_resize_pad", image)
    return image


def finish_canvas(canvas, options=PreprocessOptions(), stages=None, augmentation=None):
    """The last stages: canvas -> [augmentation, training only] -> CLAHE -> [strong] -> float32
    (height, width, channels) in [0, 1]. `augmentation`: a function of one 8-bit image."""
    def keep(name, stage):
        if stages is not None:
            stages[name] = stage

    image = canvas
    if augmentation is not None:
        image = augmentation(image)
        keep("3a_augment", image)
    if options.clahe_clip:
        image = equalize(image, options.clahe_clip, options.clahe_tiles)
        keep("4_clahe", image)
    if options.strong:  # thin strokes: grow dark ink by a pixel so the early convolutions see it
        image = cv2.erode(image, np.ones((2, 2), np.uint8))
        keep("5_strong", image)
    pixels = image.astype(np.float32) / 255.0
    return pixels[:, :, np.newaxis] if pixels.ndim == 2 else pixels


def preprocess_image(image, options=PreprocessOptions(), stages=None, augmentation=None):
    """8-bit image (gray (H, W) or colour (H, W, 3), as read_image gives for options.channels) -> float32
    (height, width, channels) in [0, 1]: make_canvas, then finish_canvas.

    Pass a dict as `stages` to collect every intermediate 8-bit image (for --save_debug).
    `augmentation` (training only) alters the resized canvas: a function of one 8-bit image.
    """
    return finish_canvas(make_canvas(image, options, stages), options, stages, augmentation)


def preprocess_gray(gray, options=PreprocessOptions(), stages=None, augmentation=None):
    """preprocess_image for a gray model (kept for callers that decode gray themselves)."""
    return preprocess_image(gray, options, stages, augmentation)


def load_image(path, options=PreprocessOptions(), augmentation=None):
    return preprocess_image(read_image(path, options.channels), options, augmentation=augmentation)


def load_canvas(path, options=PreprocessOptions()):
    return make_canvas(read_image(path, options.channels), options)
