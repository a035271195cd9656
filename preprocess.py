"""The pixels: everything between a captcha file on disk and one image of model input.

One pipeline serves training and inference, so the network sees the same pixels in both:
read -> grayscale (or colour, channels=3) -> [auto-crop] -> [invert] -> aspect-preserving resize
and pad to the canvas (200x50 by default) -> CLAHE -> [strong stroke enhancement] -> scale to [0, 1].

The charset is charsets.py, listing a folder's images imagefiles.py, the error a user sees errors.py. Where
labels come from is label_sources.py; the folder scan, the split and the batch loader are dataset.py; the synthetic
captcha generators are synth.py.
"""

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from charsets import colour_name
from errors import CaptchaError

IMG_HEIGHT = 50
IMG_WIDTH = 200
MAX_IMAGE_PIXELS = 40_000_000  # no captcha is this large; refusing it keeps a stray photo from eating memory
CLAHE_CLIP = 2.0
CLAHE_TILES = (8, 8)
CHANNELS = (1, 3)  # gray, or colour (B, G, R as OpenCV decodes it)


class ImageReadError(CaptchaError):
    """An image file that cannot be used; `reason` is its short category for scan summaries."""

    def __init__(self, path, reason, detail=""):
        super().__init__(f"{path}: {reason}{f' ({detail})' if detail else ''}")
        self.reason = reason


# ----------------------------------------------------------------------------- image pipeline


RESIZE_MODES = ("default", "reference", "stretch")


@dataclass(frozen=True)
class Canvas:
    """The network's input, owned by the pixels: every image is resized and padded to height x width, read in gray
    (1 channel) or colour (3), with one constant plane per colour a reading can be asked for beside them ("type the
    red characters": 1.0 on the asked one's, with_asked_colour). The network is built to its `shape` (model.py), and
    the model's metadata stores it once, among the preprocessing options."""

    height: int = IMG_HEIGHT
    width: int = IMG_WIDTH
    channels: int = 1  # 1: gray; 3: colour, for sites whose text and clutter differ in colour more than in shade
    colours: tuple = ()  # the asked colours' names, in the order of their planes; empty: a plain model

    def __post_init__(self):
        if self.channels not in CHANNELS:
            raise CaptchaError(f"--channels {self.channels}: 1 (gray) or 3 (colour)")

    @property
    def shape(self):
        """(height, width, input channels): the image's channels, then the asked colours' planes."""
        return self.height, self.width, self.channels + len(self.colours)


@dataclass(frozen=True)
class PreprocessOptions:
    """Pipeline switches and the canvas. Saved inside every trained model, so inference repeats training's pixels."""

    canvas: Canvas = Canvas()
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

    def image_only(self):
        """These options without the asked colours' planes: the image as the network sees it, for pictures."""
        return replace(self, canvas=replace(self.canvas, colours=()))

    def to_dict(self):
        """As JSON gives it back, the canvas's fields among the others as every release has stored them (a plain
        model's without colours, so that releases before them read it)."""
        d = {k: v for k, v in asdict(self).items() if k != "canvas"}
        d.update(asdict(self.canvas), clahe_tiles=list(self.clahe_tiles), colours=list(self.canvas.colours))
        if not self.canvas.colours:
            del d["colours"]
        return d

    @classmethod
    def from_dict(cls, d):
        canvas_fields = set(Canvas.__dataclass_fields__)
        canvas = Canvas(**{k: tuple(v) if k == "colours" else v for k, v in d.items() if k in canvas_fields})
        known = set(cls.__dataclass_fields__) - {"canvas"}
        d = {k: v for k, v in d.items() if k in known}
        if "clahe_tiles" in d:
            d["clahe_tiles"] = tuple(d["clahe_tiles"])
        return cls(canvas, **d)


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
    its canvas's channels) -> [auto-crop] -> [invert] -> resize-and-pad: the 8-bit canvas (height, width[, 3]).
    It is the same every epoch, so the training loader keeps it in memory where it fits."""
    def keep(name, stage):
        if stages is not None:
            stages[name] = stage

    channels = options.canvas.channels
    if image.ndim != (2 if channels == 1 else 3):
        raise CaptchaError(f"a {'gray' if image.ndim == 2 else 'colour'} image for a model that reads "
                           f"{'gray' if channels == 1 else 'colour'} (channels {channels})")
    keep("0_gray" if image.ndim == 2 else "0_colour", image)
    if options.auto_crop:
        image = auto_crop(image)
        keep("1_crop", image)
    if options.force_invert:
        image = 255 - image
        keep("2_invert", image)
    image = resize_and_pad(image, options.canvas.height, options.canvas.width, options.resize)
    keep("3_resize_pad", image)
    return image


def finish_canvas(canvas, options=PreprocessOptions(), stages=None, augmentation=None, asked=None):
    """The last stages: canvas -> [augmentation, training only] -> CLAHE -> [strong] -> float32
    (height, width, channels) in [0, 1] -> [the asked colour's planes]. `augmentation`: a function of one 8-bit
    image; `asked`: the colour asked for, for a model that reads one (with_asked_colour)."""
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
    return with_asked_colour(pixels[:, :, np.newaxis] if pixels.ndim == 2 else pixels, options, asked)


def asked_colour_index(options, asked):
    """The plane of the asked colour: CaptchaError when the model reads none and one is given, when it reads one
    and none is given, or when it does not know the name (the line lists those it knows)."""
    colours = options.canvas.colours
    known = ", ".join(colours)
    if not colours:
        if asked:
            raise CaptchaError(f"colour {asked!r} asked, but this model was not trained with an asked colour (a "
                               f"labels file's colour column)")
        return None
    if not asked:
        raise CaptchaError(f"this model reads the colour asked for with the image: give one of {known}")
    name = colour_name(asked)
    if name not in colours:
        raise CaptchaError(f"unknown colour {asked!r}: this model knows {known}")
    return colours.index(name)


def with_asked_colour(pixels, options, asked):
    """(height, width, channels) -> (height, width, channels + colours): one constant plane per colour the model
    knows, 1.0 on the asked one's and 0.0 on the others. Every pixel of the first convolution sees which colour is
    asked, so its filters can keep the strokes of that colour and drop the rest. A plain model's pixels pass as
    they are."""
    index = asked_colour_index(options, asked)
    if index is None:
        return pixels
    planes = np.zeros(pixels.shape[:2] + (len(options.canvas.colours),), np.float32)
    planes[:, :, index] = 1.0
    return np.concatenate([pixels, planes], axis=2)


def preprocess_image(image, options=PreprocessOptions(), stages=None, augmentation=None, asked=None):
    """8-bit image (gray (H, W) or colour (H, W, 3), as read_image gives for the canvas's channels) -> float32
    (height, width, channels) in [0, 1]: make_canvas, then finish_canvas.

    Pass a dict as `stages` to collect every intermediate 8-bit image (for --save_debug).
    `augmentation` (training only) alters the resized canvas: a function of one 8-bit image. `asked`: the colour
    asked for, for a model that reads one.
    """
    return finish_canvas(make_canvas(image, options, stages), options, stages, augmentation, asked)


def preprocess_gray(gray, options=PreprocessOptions(), stages=None, augmentation=None):
    """preprocess_image for a gray model (kept for callers that decode gray themselves)."""
    return preprocess_image(gray, options, stages, augmentation)


def load_image(path, options=PreprocessOptions(), augmentation=None, asked=None):
    return preprocess_image(read_image(path, options.canvas.channels), options, augmentation=augmentation, asked=asked)


def load_canvas(path, options=PreprocessOptions()):
    return make_canvas(read_image(path, options.canvas.channels), options)
