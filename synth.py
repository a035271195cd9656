"""The built-in synthetic captchas: labelled images drawn by four generators, for the built-in data set,
the base model's pre-training, the tests, and a style the base model never saw.

    python synth.py --out data/synth/captcha --count 1000 --seed 1234
    python synth.py --style gregwar --out data/base/gregwar --count 20000 --seed 502 --length 3-8

captcha: the `captcha` package (PyPI), warped glyphs over noise dots and a curve; gregwar: like the
PHP Gregwar/Captcha (the reference's Kaggle set), JPEG, lines over a coloured background; hershey:
OpenCV's stroke fonts, arcs and dots, kept out of the base model's pre-training so that fine-tuning
on a look it never saw can be measured; varied: 23 TrueType faces on canvases of any size, colours,
clutter and warps, so that pre-training sees many looks. All are seeded: the same seed draws the same files.

Three more kinds of captcha, for development and tests: arithmetic (`3+5=?`, `12×4=`: one- and two-digit operands,
+ - × x ÷, whole answers, the captcha package's look with operators nearly upright; files numbered, the
expressions in labels.csv beside them, since `?` `/` `*` cannot be file names) and cjk (4 hanzi out of
CJK_SYMBOLS of GB2312's common ones, drawn with the WenQuanYi Micro Hei font, Apache-2.0 or GPL-3 with the font
exception: `apt-get install fonts-wqy-microhei`); and colours ("type the red characters": six symbols in four of six
inks, the label the asked ink's symbols, files numbered and labels.csv `file,label,colour` beside them).
"""

import argparse
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import random
import sys
from pathlib import Path

import cv2
import numpy as np

import cli
from charsets import CHARSET_PRESETS, DEFAULT_SYMBOLS, charset_from_arg
from errors import CaptchaError
from preprocess import IMG_HEIGHT, IMG_WIDTH


class _SeededSecrets:
    """Stands in for the `secrets` module that captcha.image draws every random choice from.

    ImageCaptcha uses `secrets` (unseedable) on purpose; for reproducible datasets we swap in a
    seeded generator with the three functions it calls.
    """

    def __init__(self, seed):
        self._rng = random.Random(seed)

    def randbelow(self, n):
        return self._rng.randrange(n)

    def randbits(self, k):
        return self._rng.getrandbits(k)

    def choice(self, seq):
        return self._rng.choice(seq)


OPERATOR_TURN = 8  # degrees either way: the captcha package turns glyphs up to 30, and + turned 30 is × turned -15


def _upright_operator_captcha(width, height, font_sizes):
    """The captcha package's ImageCaptcha with operators and `=?` turned at most OPERATOR_TURN degrees.

    Its glyphs turn up to 30 degrees either way, so a + and a × (a + turned 45) can be drawn alike and
    no reader can tell them apart; digits keep the package's turn. The draw of random numbers is the
    package's, so the same seed still draws the same image.
    """
    import captcha.image

    class UprightOperators(captcha.image.ImageCaptcha):
        def _draw_character(self, c, draw, color):
            turn = OPERATOR_TURN if c in ARITHMETIC_OPERATORS + "=?" else 30
            self.character_rotate = (-turn, turn)
            return super()._draw_character(c, draw, color)

    return UprightOperators(width=width, height=height, font_sizes=font_sizes)


def _draw_captcha_png(args, upright_operators=False):
    text, seed, width, height = args
    from io import BytesIO

    import captcha.image

    captcha.image.secrets = _SeededSecrets(seed)
    font_sizes = tuple(round(s * height / 60) for s in (42, 50, 56))  # the package's sizes, scaled
    if upright_operators:
        generator = _upright_operator_captcha(width, height, font_sizes)
    else:
        generator = captcha.image.ImageCaptcha(width=width, height=height, font_sizes=font_sizes)
    out = BytesIO()
    generator.generate_image(text).save(out, format="PNG")
    return out.getvalue()


def gregwar_fonts():
    """Six faces, as Gregwar/Captcha has, from installed packages (matplotlib's DejaVu and STIX, the
    captcha package's DroidSansMono): nothing is downloaded."""
    import captcha
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ["DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSans-BoldOblique.ttf",
             "STIXGeneralBol.ttf"]
    return [str(ttf / n) for n in names] + [str(Path(captcha.__file__).parent / "data" / "DroidSansMono.ttf")]


def _wave_distort(image, rng):
    """Gregwar's distortion: a radial ripple around a random centre plus a vertical sine wave."""
    height, width = image.shape[:2]
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    phase, scale = rng.uniform(0, 10), 1.1 + rng.uniform(0, 1 / 3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    vx, vy = xs - cx, ys - cy
    radius = np.hypot(vx, vy)
    stretch = np.where(radius > 0, (radius + 4 * np.sin(radius / 30)) / np.maximum(radius, 1e-6), 1.0)
    map_x = (cx + vx * stretch).astype(np.float32)
    map_y = (cy + vy * stretch + scale * np.sin(phase + map_x * 0.2)).astype(np.float32)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _draw_gregwar_jpeg(args):
    """One captcha in the manner of the PHP library Gregwar/Captcha (the reference's Kaggle set):
    150x40, a font per image, letters turned up to 8 degrees and shifted up to 5 px, lines behind and
    in front of the text, a wave distortion, sometimes inverted / edge-filtered / re-contrasted /
    tinted, saved as JPEG."""
    text, seed, width, height = args
    from io import BytesIO

    from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 150) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)

    def lines(count, color=None):
        for _ in range(count):
            start = (rng.randint(0, width), rng.randint(0, height))
            end = (rng.randint(0, width), rng.randint(0, height))
            draw.line([start, end], fill=color or tuple(rng.randint(100, 255) for _ in range(3)),
                      width=rng.choice([1, 1, 2]))

    lines(rng.randint(2, 3))  # behind the text
    font_path = rng.choice(gregwar_fonts())
    size = max(12, width // max(len(text), 1) - rng.randint(0, 3) - 1)
    font = ImageFont.truetype(font_path, size)
    glyphs = []
    for char in text:
        left, top, right, bottom = font.getbbox(char)
        glyph = Image.new("L", (right - left + 4, bottom - top + 4), 0)
        ImageDraw.Draw(glyph).text((2 - left, 2 - top), char, font=font, fill=255)
        glyphs.append(glyph.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, expand=True))
    x = max(0, (width - sum(g.width for g in glyphs)) // 2)
    for glyph in glyphs:
        y = (height - glyph.height) // 2 + rng.randint(-5, 5)
        image.paste(Image.new("RGB", glyph.size, ink), (x, y), glyph)
        x += glyph.width - rng.randint(0, 2)
    lines(rng.randint(2, 3), ink)  # in front of the text
    image = Image.fromarray(_wave_distort(np.asarray(image), nrng))
    if rng.random() < 0.5:
        image = ImageOps.invert(image)
    if rng.random() < 0.1:
        image = image.filter(ImageFilter.FIND_EDGES)
    if rng.random() < 0.1:
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.5, 1.8))
    if rng.random() < 0.2:
        tint = Image.new("RGB", image.size, tuple(rng.randint(0, 255) for _ in range(3)))
        image = Image.blend(image, tint, 0.3)
    out = BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


HERSHEY_FONTS = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
                 cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN]


def _hershey_background(rng, width, height):
    """A light colour, mottled."""
    background = rng.integers(170, 256, size=3)
    mottle = cv2.resize(rng.integers(-30, 30, size=(4, 8, 3)).astype(np.float32), (width, height))
    return np.clip(background + mottle, 0, 255).astype(np.uint8)


def _hershey_symbols(text, rng, width, height):
    """Places the symbols left to right: yields (alpha, top, left, ink) for each, alpha a float mask (1 where
    the stroke is) already cut to the image. Drawing and `hershey_visibility` share it, so they agree."""
    font = HERSHEY_FONTS[rng.integers(len(HERSHEY_FONTS))]
    x = int(rng.integers(2, 7))
    fit = min(1.0, 6 / max(len(text), 1))  # long texts in smaller letters, so that they fit the width
    for char in text:
        scale = rng.uniform(0.75, 1.05) * fit * height / 40 * (1.6 if font == cv2.FONT_HERSHEY_PLAIN else 1.0)
        thickness = int(rng.integers(1, 4))
        (w, h), base = cv2.getTextSize(char, font, scale, thickness)
        glyph = np.zeros((h + base + 8, w + 8), np.uint8)
        cv2.putText(glyph, char, (4, h + 4), font, scale, 255, thickness, cv2.LINE_AA)
        turn = cv2.getRotationMatrix2D((glyph.shape[1] / 2, glyph.shape[0] / 2), rng.uniform(-25, 25), 1.0)
        glyph = cv2.warpAffine(glyph, turn, (glyph.shape[1], glyph.shape[0]))
        top = int(np.clip((height - glyph.shape[0]) / 2 + rng.integers(-6, 7), 0, max(0, height - glyph.shape[0])))
        left = int(min(x, width - glyph.shape[1]))
        alpha = glyph[: height - top, : width - left] / 255.0
        ink = rng.integers(0, 120, size=3)
        yield alpha, top, left, ink
        x += int(w * rng.uniform(0.8, 1.0))  # letters touch or overlap a little, as in many captchas


def _draw_hershey_png(args):
    """A look the base model never saw (it is kept out of pre-training, to measure fine-tuning on a new
    style): OpenCV's stroke (Hershey) fonts instead of TrueType, each symbol in its own ink, thickness
    and angle on a mottled background, crossed by arcs and speckled with dots, slightly blurred."""
    text, seed, width, height = args
    rng = np.random.default_rng(seed)
    image = _hershey_background(rng, width, height)
    for alpha, top, left, ink in _hershey_symbols(text, rng, width, height):
        region = image[top : top + alpha.shape[0], left : left + alpha.shape[1]]
        region[:] = (region * (1 - alpha[..., None]) + ink * alpha[..., None]).astype(np.uint8)
    for _ in range(int(rng.integers(2, 5))):  # arcs across the text
        centre = (int(rng.integers(0, width)), int(rng.integers(-height, 2 * height)))
        axes = (int(rng.integers(width // 3, width)), int(rng.integers(height // 2, 2 * height)))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                    tuple(int(c) for c in rng.integers(0, 200, size=3)), int(rng.integers(1, 3)), cv2.LINE_AA)
    dots = rng.integers(0, [width, height], size=(int(rng.integers(100, 400)), 2))
    image[dots[:, 1], dots[:, 0]] = rng.integers(0, 256, size=(len(dots), 3))
    image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 0.9))
    return cv2.imencode(".png", image)[1].tobytes()


# The `varied` style's limits of legibility: eight symbols on a lower canvas, or the outline of a smaller glyph,
# are where a reader stops reading the label (docs/design.md, "The pre-training set").
VARIED_MIN_HEIGHT = 40
VARIED_MAX_ASPECT = 5.0  # a canvas the style picks is at most this many times as wide as it is high
HOLLOW_MIN_SIZE = 28
PEN_MIN_WIDTH = 2  # a one-pixel centre line, blurred and scaled down to the network's input, fades into the background


@functools.lru_cache(maxsize=1)
def varied_fonts():
    """The `varied` style's faces: every TrueType face of an installed package that draws all 62 symbols as
    letters and digits (matplotlib's DejaVu, STIX and Computer Modern text faces, the captcha package's
    DroidSansMono): nothing is downloaded."""
    import captcha
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    faces = [p for p in sorted(ttf.glob("DejaVu*.ttf")) if "Display" not in p.name]  # Display: no letters
    faces += sorted(ttf.glob("STIXGeneral*.ttf"))
    faces += [ttf / f"cm{face}10.ttf" for face in ("r", "b", "ss", "tt", "ti", "mi")]  # cmsy/cmex: math symbols
    return tuple(str(p) for p in faces) + (str(Path(captcha.__file__).parent / "data" / "DroidSansMono.ttf"),)


def _varied_background(rng, width, height):
    """A flat colour, a gradient between two, or coloured noise smoothed into blotches; light or dark."""
    light = rng.random() < 0.75
    low, high = (160, 256) if light else (0, 96)
    kind = rng.integers(3)
    if kind == 0:
        return np.full((height, width, 3), rng.integers(low, high, size=3), np.uint8), light
    if kind == 1:
        ramp = np.linspace(0, 1, width if rng.random() < 0.5 else height, dtype=np.float32)
        ramp = ramp[None, :, None] if ramp.size == width else ramp[:, None, None]
        a, b = rng.integers(low, high, size=(2, 3))
        return np.broadcast_to(a + (b - a) * ramp, (height, width, 3)).astype(np.uint8), light
    cells = rng.integers(low, high, size=(int(rng.integers(2, 8)), int(rng.integers(4, 16)), 3)).astype(np.float32)
    return cv2.resize(cells, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8), light


def _varied_ink(rng, light):
    """A colour that stands out from a light (or dark) background: every channel at least 64 levels away."""
    return rng.integers(0, 96, size=3) if light else rng.integers(160, 256, size=3)


def _varied_glyphs(text, rng, font_path, height):
    """Each symbol as an alpha mask (uint8), turned, sheared and scaled a little on its own, all of one height
    with the baseline in one row: a lower-case `o` stays smaller and lower than an `O` beside it, as in the face."""
    from PIL import Image, ImageDraw, ImageFont

    size = max(10, int(height * rng.uniform(0.65, 0.9)))
    font = ImageFont.truetype(font_path, size)
    ascent, descent = font.getmetrics()
    pad = size // 3
    # the stroke: the face's own, bold (an outline stroke around each filled glyph), hollow (the outline alone,
    # only where the glyphs are large enough for an outline to read) or a pen's (the glyph's centre line, each
    # symbol in a width of its own, as stroke fonts draw)
    weights, chances = ["regular", "bold", "hollow", "pen"], [0.5, 0.15, 0.1, 0.25]
    if size < HOLLOW_MIN_SIZE:
        weights, chances = weights[:2] + weights[3:], [0.55, 0.2, 0.25]
    weight = rng.choice(weights, p=chances)
    stroke = 0 if weight in ("regular", "pen") else max(1, size // (18 if weight == "bold" else 24))
    glyphs = []
    for char in text:
        left, _, right, _ = font.getbbox(char, stroke_width=stroke)
        glyph = Image.new("L", (right - left + 2 * pad, ascent + descent + 2 * pad), 0)
        ImageDraw.Draw(glyph).text((pad - left, pad), char, font=font, fill=0 if weight == "hollow" else 255,
                                   stroke_width=stroke, stroke_fill=255)  # baseline at row pad + ascent
        mask = np.asarray(glyph)
        if weight == "pen":
            mask = _pen_stroke(mask, max(PEN_MIN_WIDTH, round(rng.uniform(0.6, 3.0) * size / 40)))
        h, w = mask.shape
        # turned about the middle of the lower-case letters' height; the size varies by 8% at most, less than
        # the gap between lower and upper case (about 25% in these faces)
        turn = cv2.getRotationMatrix2D((w / 2, pad + 0.7 * ascent), rng.uniform(-30, 30), rng.uniform(0.92, 1.08))
        turn[0, 1] += rng.uniform(-0.3, 0.3)  # shear
        mask = cv2.warpAffine(mask, turn, (w, h))
        columns = np.nonzero((mask > 24).any(axis=0))[0]
        if len(columns):  # cut to the ink across; the rows stay the line's
            mask = mask[:, columns.min() : columns.max() + 1]
        glyphs.append(mask)
    rows = np.nonzero(np.any([(g > 24).any(axis=1) for g in glyphs], axis=0))[0]
    if len(rows):  # the rows no symbol inks, cut from all alike
        glyphs = [g[rows.min() : rows.max() + 1] for g in glyphs]
    return glyphs


def _pen_stroke(mask, width):
    """A filled glyph's centre line (its morphological skeleton: what is left as the glyph is worn away), drawn
    again `width` pixels wide and softened at its edge."""
    ink, line = (mask > 127).astype(np.uint8), np.zeros(mask.shape, np.uint8)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    while ink.any():
        line |= ink - cv2.morphologyEx(ink, cv2.MORPH_OPEN, cross)
        ink = cv2.erode(ink, cross)
    line = cv2.dilate(line * 255, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
    return cv2.GaussianBlur(line, (3, 3), 0.6)


def _varied_warp(rng, width, height, margin):
    """One of: nothing, a perspective tilt, a sine wave along x or y, or a smooth elastic field; none moves the
    ink by more than `margin` (its distance from the canvas' edge), so no symbol is pushed off the canvas.
    Returns (warp an image, where a point (x, y) of the picture lands), or None for nothing."""
    kind = rng.integers(4)
    if kind == 1:  # the corners move inwards only: the picture is tilted and shrunk, never cut
        corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
        inwards = np.float32([[1, 1], [-1, 1], [-1, -1], [1, -1]])
        moved = (corners + inwards * rng.uniform(0, 0.12, size=(4, 2)) * [width, height]).astype(np.float32)
        matrix = cv2.getPerspectiveTransform(corners, moved)
        return (lambda image, interpolation, border: cv2.warpPerspective(
                    image, matrix, (width, height), flags=interpolation, borderMode=border),
                lambda points: cv2.perspectiveTransform(points[None].astype(np.float32), matrix)[0])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    reach = max(1.0, float(margin) - 1)
    if kind == 2:
        amplitude = rng.uniform(1, max(1.0, min(0.1 * height, reach)))
        period, phase = rng.uniform(0.5, 2) * width, rng.uniform(0, 6.3)
        dy = amplitude * np.sin(2 * np.pi * xs / period + phase)
        dx = min(reach, rng.uniform(0, 2)) * np.sin(2 * np.pi * (ys + dy) / height + phase)
    elif kind == 3:
        field = rng.uniform(-1, 1, size=(2, 4, 8)).astype(np.float32) * rng.uniform(1, max(1.0, min(0.08 * height,
                                                                                                   reach)))
        dx = np.clip(cv2.resize(field[0], (width, height), interpolation=cv2.INTER_CUBIC), -reach, reach)
        dy = np.clip(cv2.resize(field[1], (width, height), interpolation=cv2.INTER_CUBIC), -reach, reach)
    else:
        return None
    # the pixel of the picture that each pixel of the result shows
    map_x, map_y = (xs + dx).astype(np.float32), (ys + dy).astype(np.float32)

    def land(points):  # a smooth field: a point moves by about minus the field where it is
        x, y = np.clip(points[:, 0].astype(int), 0, width - 1), np.clip(points[:, 1].astype(int), 0, height - 1)
        return np.stack([points[:, 0] - dx[y, x], points[:, 1] - dy[y, x]], axis=1)

    return (lambda image, interpolation, border: cv2.remap(image, map_x, map_y, interpolation, borderMode=border),
            land)


def _varied_clutter(image, rng, ink, light):
    """Lines, curves through the text (some in the text's own colour), dots and small blobs."""
    height, width = image.shape[:2]

    def colour():
        return tuple(int(c) for c in (ink if rng.random() < 0.25 else _varied_ink(rng, light)
                                      if rng.random() < 0.5 else rng.integers(0, 256, size=3)))

    # lines and curves one pixel wide: one in the text's own ink then covers no more than a thin stroke of it does
    for _ in range(int(rng.integers(0, 6))):  # straight lines
        start, end = rng.integers(0, [width, height], size=(2, 2))
        cv2.line(image, tuple(map(int, start)), tuple(map(int, end)), colour(), 1, cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.6 else 0):  # a wavy curve across the text
        xs = np.arange(0, width, 2)
        ys = height * (0.5 + rng.uniform(-0.25, 0.25)) + rng.uniform(2, 0.25 * height) * np.sin(
            2 * np.pi * xs / rng.uniform(0.3, 1.5) / width + rng.uniform(0, 6.3))
        points = np.stack([xs, ys], axis=1).astype(np.int32)[None]
        cv2.polylines(image, points, False, colour(), 1, cv2.LINE_AA)
    dots = rng.integers(0, [width, height], size=(int(rng.integers(0, width * height // 40)), 2))
    image[dots[:, 1], dots[:, 0]] = rng.integers(0, 256, size=(len(dots), 3))
    for _ in range(int(rng.integers(0, 4))):  # blobs
        centre = tuple(int(v) for v in rng.integers(0, [width, height]))
        cv2.circle(image, centre, int(rng.integers(1, max(2, height // 12))), colour(), -1, cv2.LINE_AA)
    return image


def varied_picture(text, seed, width, height):
    """The `varied` captcha (text, seed), before its encoding: (image, [(alpha, top, left)] of each symbol as
    placed, the fraction of each symbol's ink that the warp leaves on the canvas)."""
    rng = np.random.default_rng(seed)
    sized = bool(width and height)
    if not sized:
        height = int(rng.integers(VARIED_MIN_HEIGHT, 81))
        width = int(height * rng.uniform(2.0, VARIED_MAX_ASPECT))
    fonts = varied_fonts()
    glyphs = _varied_glyphs(text, rng, fonts[rng.integers(len(fonts))], height)
    gaps = [int(g.shape[1] * rng.uniform(-0.15, 0.3)) for g in glyphs[1:]] + [0]
    span = sum(g.shape[1] for g in glyphs) + sum(gaps)
    if not sized:  # a canvas of the style's own choosing grows (to its widest) before the symbols shrink
        width = max(width, min(span + 8, int(VARIED_MAX_ASPECT * height)))
    image, light = _varied_background(rng, width, height)
    image = np.ascontiguousarray(image)  # a gradient comes out of astype() with broadcast strides; OpenCV draws on none
    fit = min(1.0, (width - 8) / max(span, 1), (height - 4) / glyphs[0].shape[0])
    if fit < 1.0:  # too wide or too tall for the canvas: all symbols shrunk alike
        glyphs = [cv2.resize(g, (max(1, int(g.shape[1] * fit)), max(1, int(g.shape[0] * fit)))) for g in glyphs]
        gaps = [int(gap * fit) for gap in gaps]
        span = sum(g.shape[1] for g in glyphs) + sum(gaps)
    x = int(rng.integers(2, max(3, width - span - 1)))
    room = height - glyphs[0].shape[0]
    line_top = room / 2 + rng.uniform(-0.3, 0.3) * room  # the line, up or down within the room it has
    ink, own_inks = _varied_ink(rng, light), rng.random() < 0.4
    placed, owner = [], np.zeros((height, width), np.uint8)  # owner: which symbol's ink each pixel shows
    for number, (glyph, gap) in enumerate(zip(glyphs, gaps), start=1):
        top = int(np.clip(line_top + rng.uniform(-0.05, 0.05) * height, 0, max(0, room)))  # each a little off it
        left = int(np.clip(x, 0, width - glyph.shape[1]))
        alpha = glyph[: height - top, : width - left, None] / 255.0
        region = image[top : top + alpha.shape[0], left : left + alpha.shape[1]]
        colour = _varied_ink(rng, light) if own_inks else ink
        region[:] = (region * (1 - alpha) + colour * alpha).astype(np.uint8)
        owner[top : top + alpha.shape[0], left : left + alpha.shape[1]][alpha[..., 0] > 0.5] = number
        placed.append((alpha[..., 0], top, left))
        x += glyph.shape[1] + gap
    image = _varied_clutter(image, rng, ink, light)
    ys, xs = np.nonzero(owner)
    margin = min(xs.min(), ys.min(), width - 1 - xs.max(), height - 1 - ys.max()) if len(xs) else 0
    warp = _varied_warp(rng, width, height, margin)
    kept = [1.0] * len(placed)
    if warp is not None:
        warp_image, land = warp
        points = np.stack([xs, ys], axis=1).astype(np.float32)
        landed = land(points)
        inside = (landed[:, 0] >= 0) & (landed[:, 0] <= width - 1) & (landed[:, 1] >= 0) & (landed[:, 1] <= height - 1)
        numbers = owner[ys, xs]
        kept = [float(inside[numbers == n].mean()) if (numbers == n).any() else 1.0
                for n in range(1, len(placed) + 1)]
        if min(kept) >= 0.98:  # the bounds above keep the ink on; a warp that would still cut a symbol is not used
            image = warp_image(image, cv2.INTER_LINEAR, cv2.BORDER_REPLICATE)
        else:
            kept = [1.0] * len(placed)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 1.0))
    if rng.random() < 0.3:
        image = np.clip(image + rng.normal(0, rng.uniform(3, 15), image.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 90))])[1]
        image = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    return image, placed, kept


def _draw_varied_png(args):
    """A captcha of any look, for pre-training to cover many: a canvas of random size (40-80 px high, 2-5 times
    as wide), a face from `varied_fonts` in its own stroke, bold, hollow or a pen's centre line, symbols on one
    baseline, each turned, sheared and a little scaled, placed apart or overlapping, in one ink or each its own,
    on a flat, graded or blotched background, light or dark; hair-thin lines and curves, dots and blobs over it;
    then a perspective, wave or elastic warp that keeps the symbols on the canvas, and sometimes blur, noise or
    JPEG artefacts."""
    return cv2.imencode(".png", varied_picture(*args)[0])[1].tobytes()


def visible_fractions(symbols, width, height):
    """For symbols drawn in order over one another, each one's ink (alpha > 0.5) that the symbols drawn
    after it leave uncovered, as a fraction: 1.0 untouched, 0.0 hidden. `symbols`: (alpha, top, left)."""
    masks = []
    for alpha, top, left in symbols:
        mask = np.zeros((height, width), bool)
        mask[top : top + alpha.shape[0], left : left + alpha.shape[1]] = alpha > 0.5
        masks.append(mask)
    fractions, covered = [], np.zeros((height, width), bool)
    for mask in reversed(masks):  # the last drawn is covered by nothing
        ink = mask.sum()
        fractions.append(float((mask & ~covered).sum() / ink) if ink else 1.0)
        covered |= mask
    return fractions[::-1]


def hershey_placements(text, seed, width, height):
    """Where the `hershey` captcha (text, seed) puts each symbol: [(alpha, top, left)], as it is drawn."""
    rng = np.random.default_rng(seed)
    _hershey_background(rng, width, height)  # the same draws as the picture, so the same placements follow
    return [(alpha, top, left) for alpha, top, left, _ in _hershey_symbols(text, rng, width, height)]


def hershey_visibility(text, seed, width, height):
    """How much of each symbol of the `hershey` captcha (text, seed) its neighbours leave visible: the
    generator lets letters overlap, each drawn over the one before (the arcs are not counted)."""
    return visible_fractions(hershey_placements(text, seed, width, height), width, height)


ARITHMETIC_OPERATORS = "+-×x÷"
CJK_SYMBOLS = 1000  # hanzi the cjk style draws from (a seeded draw from GB2312's 3,755 common ones)
CJK_FONTS = ["/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
             "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"]


def arithmetic_expressions(count, seed):
    """`a OP b=?` or `a OP b=`: operands of one or two digits, a whole answer of at least 0."""
    rng = random.Random(seed)

    def operand():
        return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99)

    expressions = []
    for _ in range(count):
        op = rng.choice(ARITHMETIC_OPERATORS)
        if op == "÷":  # sites ask for whole answers
            b = rng.randint(1, 9)
            a = b * rng.randint(0, 99 // b)
        else:
            a, b = operand(), operand()
            if op == "-" and a < b:
                a, b = b, a
        expressions.append(f"{a}{op}{b}{rng.choice(['=?', '='])}")
    return expressions


def common_hanzi():
    """GB2312's level-1 hanzi (3,755: the common ones), in its order."""
    found = []
    for high in range(0xB0, 0xD8):
        for low in range(0xA1, 0xFF):
            with contextlib.suppress(UnicodeDecodeError):
                found.append(bytes([high, low]).decode("gb2312"))
    return "".join(found)


def cjk_symbols(count=CJK_SYMBOLS):
    return "".join(random.Random(0).sample(common_hanzi(), count))


def cjk_font():
    font = next((path for path in CJK_FONTS if Path(path).is_file()), None)
    if font is None:
        raise CaptchaError("the cjk style needs a CJK font: apt-get install fonts-wqy-microhei")
    return font


def _draw_cjk_png(args):
    """Hanzi in dark colours, each turned and shifted, over a light background with lines and dots."""
    from io import BytesIO

    from PIL import Image, ImageDraw, ImageFont

    text, seed, width, height = args
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randint(215, 255) for _ in range(3)))
    font = ImageFont.truetype(cjk_font(), int(height * 0.62))
    step = (width - 10) / len(text)
    for i, symbol in enumerate(text):
        glyph = Image.new("L", (height, height), 0)
        ImageDraw.Draw(glyph).text((height * 0.18, height * 0.12), symbol, font=font, fill=255)
        glyph = glyph.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
        colour = tuple(rng.randint(0, 120) for _ in range(3))
        x = int(5 + i * step + rng.uniform(-3, 3) - height * 0.18 + (step - height * 0.62) / 2)
        image.paste(Image.new("RGB", glyph.size, colour), (x, int(rng.uniform(-4, 4))), glyph)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 4)):
        draw.line([(rng.randint(0, width), rng.randint(0, height)) for _ in range(2)],
                  fill=tuple(rng.randint(60, 200) for _ in range(3)), width=1)
    for _ in range(width * height // 60):
        draw.point((rng.randrange(width), rng.randrange(height)), fill=tuple(rng.randint(80, 220) for _ in range(3)))
    out = BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# The colours style: six symbols in four of these inks, and the captcha asks for one of them ("type the red
# characters"). Each ink is jittered by up to INK_JITTER per channel, so a colour is a range, as on real sites.
INKS = {"red": (215, 35, 35), "blue": (35, 70, 215), "green": (30, 150, 50), "black": (30, 30, 30),
        "orange": (235, 130, 20), "purple": (140, 45, 170)}
INK_JITTER = 25
COLOURS_SHOWN = 4
# As such sites draw them: one letter case, and without 0/O and 1/I, which many faces draw alike (a lone symbol of
# the asked colour has no neighbour to compare its size with)
COLOURS_SYMBOLS = "".join(c for c in CHARSET_PRESETS["upper_digits"] if c not in "0O1I")


def colour_plan(text, seed):
    """The colours style's draw for one captcha: each symbol's ink name, and the name asked for (one that is
    shown). The label is the asked ink's symbols, left to right."""
    rng = random.Random(seed)
    shown = rng.sample(sorted(INKS), COLOURS_SHOWN)
    inks = [rng.choice(shown) for _ in text]
    return inks, rng.choice(sorted(set(inks)))


def asked_label(text, seed):
    """(the label, the asked colour) of the colours captcha of (text, seed)."""
    inks, asked = colour_plan(text, seed)
    return "".join(symbol for symbol, ink in zip(text, inks) if ink == asked), asked


def _draw_colours_png(args):
    """Six symbols of one face of `varied_fonts`, each in one of four inks, turned and shifted a little, over a light
    background with thin lines and dots in other inks."""
    from io import BytesIO

    from PIL import Image, ImageDraw, ImageFont

    text, seed, width, height = args
    inks, _ = colour_plan(text, seed)
    rng = random.Random(seed + 1)
    image = Image.new("RGB", (width, height), tuple(rng.randint(225, 255) for _ in range(3)))
    fonts = varied_fonts()
    font = ImageFont.truetype(fonts[rng.randrange(len(fonts))], int(height * rng.uniform(0.55, 0.7)))

    def ink(name):
        return tuple(min(255, max(0, v + rng.randint(-INK_JITTER, INK_JITTER))) for v in INKS[name])

    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):  # under the text: lines in the inks
        draw.line([(rng.randint(0, width), rng.randint(0, height)) for _ in range(2)],
                  fill=ink(rng.choice(sorted(INKS))), width=1)
    step = (width - 10) / len(text)
    for i, (symbol, name) in enumerate(zip(text, inks)):
        glyph = Image.new("L", (height, height), 0)
        ImageDraw.Draw(glyph).text((height * 0.25, height * 0.1), symbol, font=font, fill=255)
        glyph = glyph.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
        x = int(5 + i * step + (step - height) / 2 + rng.uniform(-2, 2))
        image.paste(Image.new("RGB", glyph.size, ink(name)), (x, int(rng.uniform(-4, 4))), glyph)
    for _ in range(width * height // 80):
        draw.point((rng.randrange(width), rng.randrange(height)), fill=ink(rng.choice(sorted(INKS))))
    out = BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


SYNTH_STYLES = {
    # style: (drawing function, file extension, default width, default height)
    "captcha": (_draw_captcha_png, ".png", IMG_WIDTH, IMG_HEIGHT),
    "gregwar": (_draw_gregwar_jpeg, ".jpg", 150, 40),
    "hershey": (_draw_hershey_png, ".png", 160, 60),  # never in the base model's pre-training
    "varied": (_draw_varied_png, ".png", None, None),  # a canvas of random size for each image
}
KIND_STYLES = {  # other kinds of captcha: labels of their own (not the --charset/--length draw)
    "arithmetic": (functools.partial(_draw_captcha_png, upright_operators=True), ".png", 240, 60),
    "cjk": (_draw_cjk_png, ".png", 200, 60),
    "colours": (_draw_colours_png, ".png", 200, 60),
}
ALL_STYLES = {**SYNTH_STYLES, **KIND_STYLES}


def parse_length(text):
    """`--length`: "5" -> 5, "3-8" -> (3, 8)."""
    low, _, high = text.partition("-")
    if not (low.isdigit() and (not high or high.isdigit())):
        raise CaptchaError(f"--length {text!r}: a length like 5 or a range like 3-8")
    return (int(low), int(high)) if high else int(low)


def random_labels(count, symbols, length, seed):
    """`length` is an int or a (min, max) range of label lengths."""
    rng = random.Random(seed)
    low, high = (length, length) if isinstance(length, int) else length
    return ["".join(rng.choice(symbols) for _ in range(rng.randint(low, high))) for _ in range(count)]


def unique_filename(label, taken, extension=".png"):
    """`label.png`, or `label_1.png`... when a name is taken (compared case-blind for macOS/Windows)."""
    name, n = f"{label}{extension}", 0
    while name.lower() in taken:
        n += 1
        name = f"{label}_{n}{extension}"
    taken.add(name.lower())
    return name


def plan_synthetic(count, seed, symbols, length, width, height):
    """The drawing jobs of a synthetic set: (label, image seed, width, height) for each image, in order."""
    labels = random_labels(count, symbols, length, seed)
    return [(label, seed * 1_000_003 + i, width, height) for i, label in enumerate(labels)]


@dataclasses.dataclass(frozen=True)
class Drawing:
    """What generate_synthetic draws: a style's look, texts of `length` symbols (an int, or (shortest, longest))
    from `symbols`, on images of the style's size unless `width`/`height` say otherwise."""

    style: str = "captcha"
    symbols: str = DEFAULT_SYMBOLS
    length: object = 5
    width: int | None = None
    height: int | None = None


def generate_synthetic(out_dir, count, drawing=Drawing(), seed=1234, workers=None, progress=True):
    """Draw `count` labelled captchas (`drawing`: a Drawing) into `out_dir`, each named by its text.

    style "captcha": the `captcha` package's ImageCaptcha, 200x50 PNG; "gregwar": the look of the
    PHP library Gregwar/Captcha, 150x40 JPEG; "hershey": stroke fonts, 160x60 PNG; "varied": many
    faces and looks, PNG of a random size (40-80 px high, 2-5 times as wide). Image i depends
    only on (seed, i): the same call always writes the same files, with any number of workers.
    """
    style = drawing.style
    if style not in ALL_STYLES:
        raise CaptchaError(f"unknown synthetic style {style!r}; choose from {sorted(ALL_STYLES)}")
    draw, extension, default_width, default_height = ALL_STYLES[style]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if style == "cjk":
        cjk_font()  # refused here, not in a worker
    jobs = plan_synthetic(count, seed, drawing.symbols, drawing.length, drawing.width or default_width,
                          drawing.height or default_height)
    if style == "arithmetic":
        jobs = [(text, *job[1:]) for text, job in zip(arithmetic_expressions(count, seed), jobs)]
    numbered = style in ("arithmetic", "colours")  # an expression is no file name; a colours label is part of one
    workers = workers or min(os.cpu_count() or 1, max(1, count // 500))  # a few images: not worth a pool's start
    taken = {p.name.lower() for p in out_dir.iterdir()}
    written = []
    with contextlib.ExitStack() as stack:
        if workers > 1:  # "spawn", not fork: a forked child of a process whose threads (TensorFlow's, a
            #              loader's) held a lock at the fork waits for it forever (seen in the test suite)
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            images = pool.imap(draw, jobs, chunksize=64)
        else:
            images = map(draw, jobs)
        if progress:
            from tqdm import tqdm

            images = tqdm(images, total=count, desc=f"drawing {style} captchas into {out_dir}", unit="img")
        for (label, *_), data in zip(jobs, images):
            name = f"{len(taken):06d}" if numbered else label
            path = out_dir / unique_filename(name, taken, extension)
            path.write_bytes(data)
            written.append(path)
    if style == "arithmetic":
        with open(out_dir / "labels.csv", "a", encoding="utf-8") as f:
            f.writelines(f"{path.name},{label}\n" for path, (label, *_) in zip(written, jobs))
    if style == "colours":
        header = not (out_dir / "labels.csv").exists()
        with open(out_dir / "labels.csv", "a", encoding="utf-8") as f:
            f.writelines(["file,label,colour\n"] * header + [
                "{},{},{}\n".format(path.name, *asked_label(text, image_seed))
                for path, (text, image_seed, *_) in zip(written, jobs)])
    return written


def write_visibility(csv_path, count, seed, symbols, length, style):
    """`synth.py --visibility`: one row per image (file name, label, least visible symbol's fraction)."""
    if style != "hershey":
        raise CaptchaError(f"--visibility is measured for --style hershey only, not {style!r}")
    _, extension, width, height = SYNTH_STYLES[style]
    taken, rows = set(), ["file,label,least_visible"]
    for label, image_seed, _, _ in plan_synthetic(count, seed, symbols, length, width, height):
        rows.append(f"{unique_filename(label, taken, extension)},{label},"
                    f"{min(hershey_visibility(label, image_seed, width, height)):.3f}")
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    Path(csv_path).write_text("\n".join(rows) + "\n")
    print(f"wrote the visibility of {count} {style} captchas to {csv_path}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synth", help="folder to write into (default: data/synth)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--charset", default="default", help=f"preset {sorted(CHARSET_PRESETS)} or symbols")
    parser.add_argument("--length", help="label length, or a range like 4-6 (default: 5; cjk 4; colours 6, the "
                                         "symbols shown, of which the label is those of the asked colour)")
    parser.add_argument("--style", default="captcha", choices=sorted(ALL_STYLES),
                        help="captcha: the `captcha` package (default); gregwar: like the PHP Gregwar/Captcha; "
                             "hershey: stroke fonts, never in the base model's pre-training; varied: many faces, "
                             "sizes, colours, clutter and warps; arithmetic: expressions (labels.csv); cjk: 4 hanzi "
                             f"of {CJK_SYMBOLS} (--charset a file or the symbols for others); colours: 6 symbols (upper case "
                             "and digits but 0, O, 1, I) in 4 inks, labelled with the asked ink's symbols (labels.csv: file,label,colour)")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument("--visibility", metavar="CSV",
                        help="hershey only: draw nothing; write, for each image this command would draw into an "
                             "empty --out, how much of its least visible symbol the others leave uncovered")
    args = parser.parse_args(argv)

    def run():
        length = parse_length(args.length or {"cjk": "4", "colours": "6"}.get(args.style, "5"))
        symbols = cjk_symbols() if args.style == "cjk" and args.charset == "default" else \
            COLOURS_SYMBOLS if args.style == "colours" and args.charset == "default" else \
            charset_from_arg(args.charset).symbols
        if args.visibility:
            write_visibility(args.visibility, args.count, args.seed, charset_from_arg(args.charset).symbols, length,
                             args.style)
            return
        written = generate_synthetic(args.out, args.count, Drawing(args.style, symbols, length), args.seed,
                                     workers=args.workers or None)
        print(f"wrote {len(written)} images to {args.out}")

    return cli.exit_status(run, ValueError, OSError)


if __name__ == "__main__":
    sys.exit(main())
