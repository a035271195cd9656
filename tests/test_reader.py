"""reader.py: decoding and confidence (greedy and beam search), allowed symbols, letter case, the stored threshold
and the length rule applied by every reader (Keras, ONNX, test.py, serve.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_serve import call, multipart, serving

import model
import errors
import imagefiles
import preprocess
import reader
import test as read_captchas  # the project's test.py (reads captchas), not a test module
from conftest import READER, READER_IMAGES, ROOT, one_hot_probs
from charsets import Charset


def test_a_stored_threshold_keeps_the_weights_and_is_applied_by_keras_and_onnx_readers(thresholded_reader):
    keras_path, onnx_path, threshold = thresholded_reader
    weights = [model.load_model(path)[0].get_weights() for path in (keras_path, READER)]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    for path in (keras_path, onnx_path):
        assert reader.Reader(path).low_confidence_rule().threshold == threshold
        assert reader.Reader(path).low_confidence_rule(0.25).threshold == 0.25  # --min_confidence overrides
    assert reader.Reader(READER).low_confidence_rule().threshold == 0.0  # a model without one marks none by it


def test_serve_py_marks_low_answers_by_the_stored_threshold(thresholded_reader):
    _, onnx_path, threshold = thresholded_reader
    with serving(onnx_path) as url:
        status, answer = call(f"{url}/model")
        assert status == 200 and answer["min_confidence"] == pytest.approx(threshold)
        status, answer = call(f"{url}/read_batch", *multipart("images", [(p.name, p.read_bytes())
                                                                          for p in READER_IMAGES]))
    assert status == 200 and [r["text"] for r in answer["results"]] == [p.stem for p in READER_IMAGES]
    assert [r["low_confidence"] for r in answer["results"]] == [r["confidence"] < threshold for r in answer["results"]]
    assert sum(r["low_confidence"] for r in answer["results"]) == 4


def assert_refit_as_four(readings):
    """(text, low_confidence) per fixture image, read by the four-symbol reader: the 4-symbol images read as
    named and trusted; the 3-symbol ones (which the network reads right) refit to 4 symbols and marked low."""
    assert {len(path.stem) for path in READER_IMAGES} == {3, 4}
    for (text, low), path in zip(readings, READER_IMAGES, strict=True):
        if len(path.stem) == 4:
            assert (text, low) == (path.stem, False)
        else:
            assert len(text) == 4 and low, (path.name, text)


def test_readings_of_a_length_no_typed_label_has_are_refit_and_marked_low_by_test_py(four_symbol_reader, tmp_path):
    keras_path, _ = four_symbol_reader
    for flags in ([], ["--min_confidence", "0"]):  # the length rule stands whatever the confidence threshold
        output = tmp_path / "readings.json"
        assert read_captchas.main(["--model", str(keras_path), "--folder", str(READER_IMAGES[0].parent),
                                   "--output", str(output), *flags]) == 0
        rows = json.loads(output.read_text())["readings"]
        assert_refit_as_four([(row["prediction"], row["low_confidence"]) for row in rows])


def test_readings_of_a_length_no_typed_label_has_are_refit_and_marked_low_by_serve_py(four_symbol_reader):
    _, onnx_path = four_symbol_reader
    with serving(onnx_path) as url:
        status, answer = call(f"{url}/model")
        assert status == 200 and answer["label_lengths"] == [4, 4]
        status, answer = call(f"{url}/read_batch", *multipart("images", [(p.name, p.read_bytes())
                                                                          for p in READER_IMAGES]))
    assert status == 200
    assert_refit_as_four([(r["text"], r["low_confidence"]) for r in answer["results"]])


def probs_of(rows, symbols="aAbB", blank=0):
    """(1, T, classes) from per-step {symbol or "-" (blank): probability}; the rest share what is left."""
    charset = Charset(symbols, blank)
    probs = np.zeros((1, len(rows), charset.num_classes), np.float32)
    for t, row in enumerate(rows):
        for symbol, p in row.items():
            probs[0, t, blank if symbol == "-" else charset.encode(symbol)[0]] = p
        rest = probs[0, t] == 0
        probs[0, t, rest] = (1 - probs[0, t].sum()) / max(1, rest.sum())
    return probs, charset


def test_confidence_is_the_probability_of_the_decoded_path():
    probs, charset = probs_of([{"a": 0.9}, {"-": 0.8}, {"b": 0.6}])
    texts, confidences, refit = reader.decode_with_confidence(probs, charset)
    assert texts == ["ab"] and confidences[0] == pytest.approx(0.9 * 0.8 * 0.6, rel=1e-5) and refit == [False]
    unsure, _ = probs_of([{"a": 0.9}, {"-": 0.8}, {"b": 0.3}])
    assert reader.decode_with_confidence(unsure, charset)[1][0] < confidences[0]


def test_beam_search_confidence_is_a_probability():
    probs, charset = probs_of([{"a": 0.9}, {"-": 0.8}, {"b": 0.6}])
    texts, confidences, _ = reader.decode_with_confidence(probs, charset, beam_width=4)
    # the beam sums every path that reads "ab", so at least the greedy path's probability
    assert texts == ["ab"] and 0.9 * 0.8 * 0.6 <= confidences[0] <= 1.0


def test_beam_search_reads_what_kerass_own_beam_search_reads():
    """The NumPy beam search (for every model format, no Keras needed) against Keras' (TensorFlow's decoder)."""
    from keras import ops

    charset = Charset("abc")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 12, charset.num_classes)) * rng.uniform(0.5, 4, size=(64, 1, 1))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    ours, our_scores, _ = reader.decode_with_confidence(probs, charset, beam_width=8)
    decoded, scores = ops.ctc_decode(np.log(probs), np.full((64,), 12, dtype=np.int32), strategy="beam_search",
                                     beam_width=8, top_paths=1, mask_index=charset.blank_index)
    theirs = [charset.decode(row) for row in ops.convert_to_numpy(decoded)[0]]
    agree = [a == b for a, b in zip(ours, theirs)]
    assert sum(agree) >= 62  # two decoders may break a near-tie differently
    # a text's probability sums the paths the beam kept: decoders that prune alike agree to rounding, and
    # on the few where their beams differed, within a few percent
    relative = np.abs(np.array(our_scores) / np.exp(ops.convert_to_numpy(scores)[:, 0]) - 1)[agree]
    assert np.median(relative) < 1e-4 and relative.max() < 0.1


def test_a_reading_of_a_length_no_typed_label_has_is_refit_by_beam_search_and_stays_low():
    # a faint b between a and c: the likeliest path skips it (blank 0.55 > b 0.45), so greedy reads "ac"
    probs, charset = probs_of([{"a": 0.9}, {"-": 0.9}, {"-": 0.5, "b": 0.45}, {"-": 0.9}, {"A": 0.9}])
    assert reader.decode_with_confidence(probs, charset).texts == ["aA"]
    for beam_width in (0, 8):
        texts, confidences, refit = reader.decode_with_confidence(probs, charset, beam_width, lengths=(3, 3))
        assert texts == ["abA"] and refit == [True] and 0 < confidences[0] <= 1
        # lengths that allow the likeliest text leave it as it is
        texts, _, refit = reader.decode_with_confidence(probs, charset, beam_width, lengths=(2, 3))
        assert texts == ["aA"] and refit == [False]
    # b or B twice, or blank: the likeliest path reads "aA", the likeliest text "abA" (b's paths add up); the
    # greedy reading of another length is refit, so it stays low even though the beam's likeliest text fits
    faint_b = {"-": 0.4, "b": 0.35, "B": 0.25}
    probs, charset = probs_of([{"a": 0.9}, faint_b, faint_b, {"A": 0.9}])
    assert reader.decode_with_confidence(probs, charset).texts == ["aA"]
    assert reader.decode_with_confidence(probs, charset, 8, lengths=(3, 3)).refit == [False]  # beam: its likeliest
    texts, _, refit = reader.decode_with_confidence(probs, charset, lengths=(3, 3))
    assert texts == ["abA"] and refit == [True]
    # a refit reading is marked low whatever its confidence; a reading of a typed length only below the threshold
    rule = reader.LowConfidenceRule(0.5, (3, 3), "")
    assert rule.is_low("abA", 0.99, refit=True) and not rule.is_low("abA", 0.99) and rule.is_low("abA", 0.4)
    assert rule.is_low("aA", 0.99)


def test_allowed_symbols_are_masked_before_decoding():
    probs, charset = probs_of([{"a": 0.5, "b": 0.4}, {"-": 0.9}])
    assert reader.decode(probs, charset) == ["a"]
    masked = reader.restrict(probs, charset, allowed="bB")
    texts, confidences, _ = reader.decode_with_confidence(masked, charset)
    assert texts == ["b"] and np.allclose(masked.sum(axis=-1), 1.0)  # still probabilities
    assert confidences[0] == pytest.approx(0.4 / (0.4 + probs[0, 0, charset.encode("B")[0]] + probs[0, 0, 0])
                                           * masked[0, 1].max(), rel=1e-5)
    with pytest.raises(errors.CaptchaError, match="cannot read 'z'"):
        reader.symbols_arg("abz", charset)
    assert reader.symbols_arg("lower", Charset("abcdefghijklmnopqrstuvwxyz")) == "abcdefghijklmnopqrstuvwxyz"


def test_case_folding_adds_each_letters_two_cases():
    # b alone is the most likely class, but a and A together are more likely still
    probs, charset = probs_of([{"a": 0.3, "A": 0.3, "b": 0.35}, {"-": 0.9}])
    assert reader.decode(probs, charset) == ["b"]
    for case, expected in [("lower", "a"), ("upper", "A")]:
        folded = reader.restrict(probs, charset, case=case)
        assert reader.decode_with_confidence(folded, charset, case=case)[0] == [expected]
    only_upper = Charset("AB")  # a model that reads one case: its answers are folded all the same
    probs, _ = probs_of([{"A": 0.9}, {"-": 0.9}], "AB")
    assert reader.decode_with_confidence(probs, only_upper, case="lower")[0] == ["a"]


def test_reading_onnx_loads_neither_keras_nor_tensorflow(onnx_model, digits_folder):
    image = imagefiles.list_images(digits_folder)[0]
    code = ("import sys, test; code = test.main(['--model', sys.argv[1], '--image', sys.argv[2], '--beam_width', '4']); "
            "loaded = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
            "print('LOADED', loaded); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, str(onnx_model), str(image)], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert f"{image} -> " in result.stdout and "LOADED []" in result.stdout


@pytest.mark.parametrize("blank", [0, 62])
@pytest.mark.parametrize("beam_width", [0, 8])
def test_decode_honours_the_blank_position(blank, beam_width):
    charset = Charset(blank_index=blank)
    a, b, x = charset.encode("abx")
    # a a _ b b x _ x  ->  "abxx": repeats merge, a blank separates a real double letter
    probs = one_hot_probs([a, a, blank, b, b, x, blank, x])
    assert reader.decode(probs, charset, beam_width) == ["abxx"]
    wrong = Charset(blank_index=62 - blank)  # misreading the blank position garbles the text
    assert reader.decode(probs, wrong, beam_width) != ["abxx"]


def test_the_readmes_three_line_api_runs_as_written_from_the_files_it_names_without_tensorflow(tmp_path, onnx_model):
    readme = (ROOT / "README.md").read_text()
    example = readme.split("## Reading", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in example.splitlines() if line and not line.startswith("print")]) == 3
    listed = readme.split("copy the seven files it", 1)[1].split("`")[1].split()
    for name in listed:  # as the README lists them
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    (tmp_path / "site.onnx").write_bytes(onnx_model.read_bytes())
    image = READER_IMAGES[0]
    (tmp_path / "captcha.png").write_bytes(image.read_bytes())
    (tmp_path / "example.py").write_text(example + "import sys\nprint(sorted({'tensorflow', 'keras'} & set(sys.modules)))\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    printed, imported = result.stdout.splitlines()
    text, confidence, low, answer = printed.split()
    assert text == answer == image.stem and 0 < float(confidence) <= 1 and low == "False"
    assert imported == "[]"


def test_read_takes_bytes_a_path_or_a_decoded_image_and_settings_only_by_keyword(onnx_model):
    captcha_reader = reader.Reader.load(onnx_model, min_confidence=0.0)
    image = READER_IMAGES[1]
    by_path = captcha_reader.read(image)
    assert captcha_reader.read(image.read_bytes()) == by_path == captcha_reader.read(str(image))
    assert captcha_reader.read(preprocess.read_image(image, captcha_reader.options.canvas.channels)) == by_path
    assert by_path.text == image.stem and by_path.answer == image.stem and not by_path.low
    with pytest.raises(TypeError):
        reader.Reader.load(onnx_model, "digits")  # past the path, keyword only
    with pytest.raises(errors.CaptchaError, match="image"):
        captcha_reader.read(b"not an image")
