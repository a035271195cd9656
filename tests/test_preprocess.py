import cv2
import numpy as np
import pytest
from PIL import Image

import dataset
import labels as label_sources
import model
import preprocess
import recipes
import synth
from preprocess import CaptchaError, Charset, PreprocessOptions


def captcha_like(height=60, width=160, seed=0):
    """Dark strokes on a light, slightly noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(220, 256, (60, 160), dtype=np.uint8)
    cv2.putText(image, "aB3", (10, 45), cv2.FONT_HERSHEY_SIMPLEX, 1.2, 40, 3)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


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
    options = recipes.RECIPES["kerasio"].preprocess_options(model.PRESETS["kerasio"])
    assert (options.resize, options.clahe_clip, options.height, options.width) == ("stretch", 0.0, 50, 200)
    stages = {}
    x = preprocess.preprocess_gray(gray, options, stages)
    stretched = cv2.resize(gray, (200, 50), interpolation=cv2.INTER_LINEAR)  # the whole image, no padding
    assert np.array_equal(x[:, :, 0], stretched.astype(np.float32) / 255.0)
    assert "4_clahe" not in stages
    default = preprocess.preprocess_gray(gray, recipes.RECIPES["default"].preprocess_options(model.PRESETS["fast"]))
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
    assert preprocess.charset_from_arg("digits").symbols == "0123456789"
    assert preprocess.charset_from_arg("xyz", "last").blank_index == 3


def test_label_from_filename():
    assert label_sources.label_from_filename("data/aB3xQ.png") == "aB3xQ"
    assert label_sources.label_from_filename("aB3xQ_12.jpg") == "aB3xQ"
    assert label_sources.label_from_filename("aB3xQ-1.png") == "aB3xQ"
    assert label_sources.label_from_filename("12345.png") == "12345"


def test_scan_counts_bad_files_by_reason_and_keeps_good_ones(tmp_path):
    good = captcha_like()
    cv2.imwrite(str(tmp_path / "aB3xQ.png"), good)
    cv2.imwrite(str(tmp_path / "aB3xQ_1.png"), good)  # duplicate label
    (tmp_path / "nested").mkdir()
    cv2.imwrite(str(tmp_path / "nested" / "Zz9Yy.jpg"), good)
    cv2.imwrite(str(tmp_path / "ab#cd.png"), good)  # symbol outside the charset
    cv2.imwrite(str(tmp_path / "toolong.png"), good)  # 7 > max_len 5
    (tmp_path / "zero5.png").write_bytes(b"")
    (tmp_path / "texts.png").write_text("hello")
    png = (tmp_path / "aB3xQ.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 3])
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")

    result = dataset.scan_folder(tmp_path, Charset(), max_len=5)
    assert sorted(label for _, label in result.samples) == ["Zz9Yy", "aB3xQ", "aB3xQ"]
    counts = {reason: len(paths) for reason, paths in result.skipped.items()}
    assert counts == {"symbols outside the charset": 1, "labels longer than 5": 1, "empty file": 1,
                      "not a readable image": 2}
    assert "3 usable images" in result.summary() and "2 not a readable image" in result.summary()


def test_scan_of_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CaptchaError, match="does not exist"):
        dataset.scan_folder(tmp_path / "nope")


def test_split_is_fixed_by_seed_and_disjoint():
    samples = [(f"{i}.png", str(i)) for i in range(100)]
    train, val, test = dataset.split_samples(samples, 0.1, 0.1, seed=3)
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert set(train) | set(val) | set(test) == set(samples)
    assert not set(train) & set(test) and not set(val) & set(test)
    assert dataset.split_samples(samples, 0.1, 0.1, seed=3) == (train, val, test)
    assert dataset.split_samples(samples, 0.1, 0.1, seed=4)[2] != test


def test_synthetic_generator_is_deterministic_and_labels_files(tmp_path):
    a = synth.generate_synthetic(tmp_path / "a", 12, seed=5, workers=1, progress=False)
    b = synth.generate_synthetic(tmp_path / "b", 12, seed=5, workers=2, progress=False)
    c = synth.generate_synthetic(tmp_path / "c", 12, seed=6, workers=1, progress=False)
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert [p.name for p in a] != [p.name for p in c]
    for path in a:
        label = label_sources.label_from_filename(path)
        assert len(label) == 5 and not Charset().unknown_symbols(label)
        assert preprocess.read_gray(path).shape == (50, 200)


def test_unique_filename_avoids_case_blind_collisions():
    taken = set()
    assert synth.unique_filename("aB3xQ", taken) == "aB3xQ.png"
    assert synth.unique_filename("Ab3xq", taken) == "Ab3xq_1.png"  # one file with aB3xQ.png on macOS
    assert synth.unique_filename("AB3XQ", taken) == "AB3XQ_2.png"
    assert synth.unique_filename("zZ9", taken) == "zZ9.png"
    assert label_sources.label_from_filename("AB3XQ_2.png") == "AB3XQ"


def test_batches_stream_padded_labels(digits_folder):
    samples = dataset.scan_folder(digits_folder).samples
    charset = preprocess.charset_from_arg("digits")
    batches = dataset.make_batches(samples, charset, 4, batch_size=16, shuffle=True, seed=1, workers=1)
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (16, 50, 200, 1) and labels.shape == (16, 4) and labels.dtype == np.int32
    lengths = (labels != preprocess.PAD_LABEL).sum(axis=1)
    assert set(lengths) <= {3, 4} and 3 in set((batches.labels != -1).sum(axis=1))
    first_order = batches.order.copy()
    batches.on_epoch_end()
    assert sorted(batches.order) == sorted(first_order) and list(batches.order) != list(first_order)
    last_images, _ = batches[2]
    assert len(last_images) == 40 - 32


def test_scan_command_summarises_and_lists_skipped_files(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "aB3xQ.png"), captcha_like())
    (tmp_path / "zero5.png").write_bytes(b"")
    assert dataset.main(["scan", str(tmp_path), "--verbose"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["labels: file names, rule 'name' (auto, from all 2 names: aB3xQ.png -> 'aB3xQ', zero5.png -> "
                   "'zero5')", "1 usable images; skipped 1 empty file",
                   "charset: 5 symbols 'BQax3'; labels up to 5 characters; letter case: keep",
                   "channels: gray (1), decided from the images: 0 of 1 carry colour (median saturation 0, colour "
                   "from 50); set it with --channels 1 or 3",
                   f"skipped (empty file): {tmp_path / 'zero5.png'}"]
    assert dataset.main(["scan", str(tmp_path / "missing")]) == 2
    assert "missing: folder does not exist" in capsys.readouterr().err


def test_split_keeps_every_image_of_a_label_on_one_side():
    samples = [(f"{i % 40}_{i // 40}.png", str(i % 40)) for i in range(120)]  # 40 labels, 3 images each
    parts = dataset.split_samples(samples, 0.1, 0.1, seed=1)
    labels = [{label for _, label in part} for part in parts]
    assert not labels[0] & labels[2] and not labels[1] & labels[2] and not labels[0] & labels[1]
    assert [len(part) for part in parts] == [96, 12, 12] and sum(parts, []) != [] and set(sum(parts, [])) == set(samples)
    with pytest.raises(CaptchaError, match="at least 3 different labels"):
        dataset.split_samples([("a.png", "a"), ("a_1.png", "a"), ("b.png", "b")])
