"""preprocess.py: the one pixel path for training and reading, image formats, and the charset."""

import cv2
import numpy as np
import pytest
from PIL import Image

import dataset
import label_sources
import model
import charsets
import preprocess
import reader
import recipes
import runstate
from conftest import captcha_like
from charsets import Charset
from errors import CaptchaError
from preprocess import PreprocessOptions


def test_training_and_inference_see_the_same_pixels(trained_run, digits_folder):
    model_path = trained_run / runstate.BEST_NAME
    _, meta = model.load_model(model_path)
    samples = dataset.scan_folder(digits_folder).samples[:4]
    charset = Charset.from_dict(meta["charset"])
    training_options = preprocess.PreprocessOptions.from_dict(meta["preprocess"])
    train_images, _ = dataset.make_batches(samples, charset, 4, dataset.Batching(options=training_options, batch_size=4), workers=1)[0]
    as_read = reader.Reader(model_path)  # what test.py and serve.py read with, without flags
    for (path, _), train_image in zip(samples, train_images):
        test_image, error = as_read.prepare(path)
        assert error is None and np.array_equal(test_image, train_image)
    # and the flags do change them
    changed, _ = reader.Reader.load(model_path, strong=True).prepare(samples[0][0])
    assert not np.array_equal(changed, train_images[0])


def test_pipeline_output_shape_dtype_and_range():
    for shape in [(60, 160), (40, 150), (50, 200), (300, 80), (12, 400)]:
        x = preprocess.preprocess_gray(captcha_like(*shape), PreprocessOptions())
        assert x.shape == (50, 200, 1) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert x.max() - x.min() > 0.3  # contrast survives


def test_resize_keeps_aspect_ratio_and_pads_with_background():
    image = np.full((100, 100), 255, np.uint8)
    image[25:75, 25:75] = 0  # a square must stay a square
    out = preprocess.resize_and_pad(image, 50, 200)
    rows, cols = np.nonzero(out < 128)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert abs(height - width) <= 1 and 23 <= height <= 27
    assert out[:, :70].min() == 255 and out[:, 130:].min() == 255  # padding is the background


def test_the_keras_io_contender_reads_stretched_pixels_without_clahe():
    gray = captcha_like(60, 160)
    options = recipes.RECIPES["kerasio"].preprocess_options()
    assert (options.resize, options.clahe_clip, options.canvas.height, options.canvas.width) == ("stretch", 0.0, 50, 200)
    stages = {}
    x = preprocess.preprocess_gray(gray, options, stages)
    stretched = cv2.resize(gray, (200, 50), interpolation=cv2.INTER_LINEAR)  # the whole image, no padding
    assert np.array_equal(x[:, :, 0], stretched.astype(np.float32) / 255.0)
    assert "4_clahe" not in stages
    default = preprocess.preprocess_gray(gray, recipes.RECIPES["default"].preprocess_options())
    assert not np.array_equal(default, x)  # the default recipe pads to the aspect ratio and equalises


def test_options_change_pixels_as_documented():
    gray = captcha_like()
    plain = preprocess.preprocess_gray(gray, PreprocessOptions(auto_crop=False))
    inverted = preprocess.preprocess_gray(gray, PreprocessOptions(auto_crop=False, force_invert=True))
    strong = preprocess.preprocess_gray(gray, PreprocessOptions(auto_crop=False, strong=True))
    assert plain.mean() > 0.5 > inverted.mean()  # light paper becomes dark
    assert (strong <= plain + 1e-6).all() and strong.mean() < plain.mean()  # strokes only grow darker


def test_auto_crop_cuts_empty_margins():
    image = np.full((200, 600), 250, np.uint8)
    cv2.putText(image, "xY7", (250, 110), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 0, 2)
    cropped = preprocess.auto_crop(image)
    assert cropped.shape[0] < 60 and cropped.shape[1] < 120
    assert cropped.min() == 0  # the text is inside


@pytest.mark.parametrize("kind", ["gray.png", "rgb.jpg", "rgba.png", "16bit.png", "palette.png", "cmyk.jpg",
                                  "rgb.bmp", "rgb.webp", "rgb.gif", "upper.PNG"])
def test_reads_every_common_format(tmp_path, kind):
    gray = captcha_like()
    path = tmp_path / kind
    rgb = Image.fromarray(gray).convert("RGB")
    if kind == "gray.png" or kind == "upper.PNG":
        Image.fromarray(gray).save(path, format="PNG")
    elif kind == "16bit.png":
        cv2.imwrite(str(path), gray.astype(np.uint16) * 257)
    elif kind == "rgba.png":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.where(gray < 128, 255, 0).astype(np.uint8)))  # paper transparent
        rgba.save(path)
    elif kind == "palette.png":
        rgb.convert("P").save(path)
    elif kind == "cmyk.jpg":
        rgb.convert("CMYK").save(path, quality=95)
    else:
        rgb.save(path)
    read = preprocess.read_gray(path)
    assert read.dtype == np.uint8 and read.shape == gray.shape
    ink = gray < 128
    if kind == "rgba.png":  # transparent paper reads as white paper
        assert (read[~ink] == 255).all()
    tolerance = 25 if kind == "palette.png" else 12  # a 256-colour palette quantizes the gray levels
    assert np.abs(read[ink].astype(int) - gray[ink].astype(int)).mean() < tolerance
    assert np.abs(read.astype(int) - gray.astype(int)).mean() < tolerance + 10 * (kind == "rgba.png")
    assert preprocess.load_image(path).shape == (50, 200, 1)


@pytest.mark.parametrize("content, problem", [(b"", "empty file"), (b"not an image at all", "not a readable image")])
def test_unreadable_files_raise_one_clear_error(tmp_path, content, problem):
    path = tmp_path / "aB3xQ.png"
    path.write_bytes(content)
    with pytest.raises(CaptchaError, match=problem) as error:
        preprocess.read_gray(path)
    assert str(path) in str(error.value)


def test_charset_round_trip_with_blank_first_and_last():
    for blank in (0, 62):
        charset = Charset(blank_index=blank)
        indices = charset.encode("aB3xQz09")
        assert blank not in indices and all(0 <= i < 63 for i in indices)
        assert charset.decode(indices) == "aB3xQz09"
        assert charset.decode([blank] + indices + [-1, blank]) == "aB3xQz09"  # blanks and padding vanish
    assert Charset().encode("A") == [1] and Charset(blank_index=62).encode("A") == [0]
    assert Charset().num_classes == 63


def test_charset_rejects_bad_definitions_and_text():
    with pytest.raises(CaptchaError, match="repeats"):
        Charset("abca")
    with pytest.raises(CaptchaError, match="blank_index"):
        Charset("abc", blank_index=1)
    with pytest.raises(CaptchaError, match="outside the charset"):
        Charset("abc").encode("abd")
    assert charsets.charset_from_arg("digits").symbols == "0123456789"
    assert charsets.charset_from_arg("xyz", "last").blank_index == 3


def test_label_from_filename():
    assert label_sources.label_from_filename("data/aB3xQ.png") == "aB3xQ"
    assert label_sources.label_from_filename("aB3xQ_12.jpg") == "aB3xQ"
    assert label_sources.label_from_filename("aB3xQ-1.png") == "aB3xQ"
    assert label_sources.label_from_filename("12345.png") == "12345"
