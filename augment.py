"""Label-preserving augmentation of training images, on the fly (never for validation or test).

A few hundred captchas of one site are too few for a CRNN to learn the symbols rather than the
images; small random changes that a site's own captchas also show (the text a little turned,
sheared, moved or scaled, the strokes thinner or bolder, blur, noise, other contrast) make each
epoch's images new. Every change is mild enough that the label still reads the same.

Works on the 8-bit canvas (gray, or colour with --channels 3) after resize-and-pad (preprocess.preprocess_gray calls it),
so it is the same for every input size. Seeded: `augment(gray, level, rng)` with the same rng state
gives the same image; the loader draws rng from (seed, epoch, sample), so each epoch differs and a
rerun repeats it.
"""

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentLevel:
    rotate: float  # degrees, either way
    shear: float  # horizontal shear factor, either way
    scale: float  # relative, either way
    shift: float  # fraction of the height (vertical) and of the height again (horizontal)
    perspective: float  # corner jitter, fraction of the height
    elastic: float  # displacement of a smooth random field, pixels (0: none)
    blur: float  # probability of a Gaussian blur
    noise: float  # largest Gaussian noise sigma, gray levels
    contrast: float  # relative, either way
    brightness: float  # gray levels, either way
    gamma: float  # log-gamma range, either way
    morph: float  # probability of thinning or thickening the strokes by one pixel


LEVELS = {
    "light": AugmentLevel(rotate=3, shear=0.15, scale=0.08, shift=0.08, perspective=0.04, elastic=0.0, blur=0.2,
                          noise=6, contrast=0.2, brightness=20, gamma=0.2, morph=0.15),
    "strong": AugmentLevel(rotate=6, shear=0.3, scale=0.15, shift=0.12, perspective=0.08, elastic=1.5, blur=0.35,
                           noise=12, contrast=0.35, brightness=35, gamma=0.35, morph=0.3),
}
CHOICES = ("none", *LEVELS)


def _geometry(gray, level, rng):
    """One perspective transform that rotates, shears, scales, shifts and jitters the corners."""
    h, w = gray.shape[:2]
    centre = np.array([w / 2, h / 2])
    angle = np.deg2rad(rng.uniform(-level.rotate, level.rotate))
    scale = 1 + rng.uniform(-level.scale, level.scale)
    shear = rng.uniform(-level.shear, level.shear)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.array(
        [[1, shear], [0, 1]])
    shift = rng.uniform(-level.shift, level.shift, size=2) * h
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    moved = (corners - centre) @ linear.T + centre + shift
    moved += rng.uniform(-level.perspective, level.perspective, size=(4, 2)) * h
    matrix = cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32))
    # Pixels brought in from outside are the canvas' own edge, so no dark frame appears.
    return cv2.warpPerspective(gray, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _elastic(gray, amount, rng):
    """A smooth random displacement field: strokes wobble the way hand-made distortions do."""
    h, w = gray.shape[:2]
    field = rng.uniform(-1, 1, size=(2, h // 8 + 2, w // 8 + 2)).astype(np.float32)
    dx = cv2.resize(field[0], (w, h), interpolation=cv2.INTER_CUBIC) * amount
    dy = cv2.resize(field[1], (w, h), interpolation=cv2.INTER_CUBIC) * amount
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(gray, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def augment(gray, level_name, rng):
    """8-bit gray (H, W) or colour (H, W, 3) -> an altered copy of the same size. level_name "none" returns it as is."""
    if level_name == "none":
        return gray
    level = LEVELS[level_name]
    image = _geometry(gray, level, rng)
    if level.elastic:
        image = _elastic(image, level.elastic, rng)
    if rng.random() < level.morph:  # the dark strokes one pixel bolder (erode) or thinner (dilate)
        kernel = np.ones((2, 2), np.uint8)
        image = cv2.erode(image, kernel) if rng.random() < 0.5 else cv2.dilate(image, kernel)
    if rng.random() < level.blur:
        image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 1.0))
    # Gamma, contrast, brightness and noise in float32 throughout (each random scalar cast, so numpy
    # never widens the image to float64: half the time of the whole augmentation otherwise).
    gamma = np.float32(np.exp(rng.uniform(-level.gamma, level.gamma)))
    contrast = np.float32(1 + rng.uniform(-level.contrast, level.contrast))
    brightness = np.float32(rng.uniform(-level.brightness, level.brightness))
    sigma = np.float32(rng.uniform(0, level.noise))
    pixels = image.astype(np.float32) * np.float32(1 / 255.0)
    pixels = np.power(pixels, gamma, out=pixels)
    pixels = ((pixels - np.float32(0.5)) * contrast + np.float32(0.5)) * np.float32(255.0) + brightness
    pixels += rng.standard_normal(size=pixels.shape, dtype=np.float32) * sigma
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
