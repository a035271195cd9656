"""Reading in production: confidence, restricted symbols, case folding, misreads for relabelling,
int8 ONNX, and exported models read without TensorFlow (the HTTP server: test_serve.py)."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

import export_safe
import metrics
import preprocess
import reader
import runstate
import test as read_captchas  # the project's test.py (reads captchas), not a test module
from conftest import READER, READER_IMAGES, ROOT, reader_labels
from preprocess import Charset


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


# ----------------------------------------------------------------------------- decoding


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
    with pytest.raises(preprocess.CaptchaError, match="cannot read 'z'"):
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


def test_confidence_ranking_splits_the_most_confident_readings():
    ranked = metrics.confidence_ranking(["a", "b", "c", "x"], ["a", "b", "c", "d"], [0.9, 0.8, 0.7, 0.1], keep=0.75)
    assert ranked["exact_match_confident"] == 1.0 and ranked["exact_match_rest"] == 0.0
    assert ranked["threshold"] == pytest.approx(0.7) and (ranked["count_confident"], ranked["count_rest"]) == (3, 1)


# ----------------------------------------------------------------------------- test.py


def test_json_output_confidence_threshold_and_review_folder(tmp_path, capsys):
    # the committed reader reads its images right and at lengths it allows, so only the threshold marks them low
    folder = READER_IMAGES[0].parent
    review = tmp_path / "review"
    args = ["--model", str(READER), "--folder", str(folder)]
    assert read_captchas.main([*args, "--output", str(tmp_path / "all.json")]) == 0
    readings = json.loads((tmp_path / "all.json").read_text())["readings"]
    confidences = sorted(r["confidence"] for r in readings)
    middle = len(confidences) // 2
    assert confidences[middle - 1] < confidences[middle]
    threshold = (confidences[middle - 1] + confidences[middle]) / 2  # half fall below it, none on it
    capsys.readouterr()
    assert read_captchas.main([*args, "--min_confidence", str(threshold), "--review_dir", str(review),
                               "--output", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    rows = saved["readings"]
    assert [r["confidence"] for r in rows] == [r["confidence"] for r in readings]
    assert all(0.0 < r["confidence"] <= 1.0 for r in rows)
    assert [r["low_confidence"] for r in rows] == [r["confidence"] < threshold for r in rows]
    low = sum(r["low_confidence"] for r in rows)
    assert 0 < low < len(rows) and f"{low} of {len(READER_IMAGES)} readings marked low" in out
    assert saved["scores"]["count"] == len(READER_IMAGES) and saved["settings"]["min_confidence"] == threshold
    expected = sorted(f"{r['prediction']}__{r['path'].split('/')[-1]}" for r in rows
                      if r["low_confidence"] or r["prediction"] != r["label"])
    assert expected and sorted(p.name for p in review.iterdir()) == expected
    copied = review / expected[0]
    assert copied.read_bytes() == (folder / expected[0].split("__", 1)[1]).read_bytes()


def test_an_image_that_cannot_be_read_is_one_line_and_a_failure(onnx_model, tmp_path, capsys):
    broken = tmp_path / "1234.png"
    broken.write_bytes(b"not an image")
    assert read_captchas.main(["--model", str(onnx_model), "--image", str(broken)]) == 2
    captured = capsys.readouterr()
    assert f"skipped: {broken}: not a readable image" in captured.err and " -> " not in captured.out


def test_csv_output_has_confidence_and_allowed_symbols_restrict_test_py(trained_run, digits_folder, tmp_path, capsys):
    model_path = trained_run / runstate.BEST_NAME
    args = ["--model", str(model_path), "--folder", str(digits_folder), "--limit", "12"]
    assert read_captchas.main([*args, "--allowed", "12", "--output", str(tmp_path / "out.csv")]) == 0
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "prediction", "confidence", "low_confidence", "label"]
    assert len(rows) == 12 and all(set(r["prediction"]) <= set("12") for r in rows)
    assert all(0.0 < float(r["confidence"]) <= 1.0 for r in rows)
    capsys.readouterr()
    assert read_captchas.main([*args, "--allowed", "12a"]) == 2
    assert "--allowed '12a': the model cannot read 'a'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- exported models


def test_reading_onnx_loads_neither_keras_nor_tensorflow(onnx_model, digits_folder):
    image = preprocess.list_images(digits_folder)[0]
    code = ("import sys, test; code = test.main(['--model', sys.argv[1], '--image', sys.argv[2], '--beam_width', '4']); "
            "loaded = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
            "print('LOADED', loaded); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, str(onnx_model), str(image)], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert f"{image} -> " in result.stdout and "LOADED []" in result.stdout


def test_int8_onnx_export_is_smaller_and_reads_like_the_float_one(onnx_model, tmp_path):
    int8 = tmp_path / "model_int8.onnx"
    assert export_safe.main(["--in_keras", str(READER), "--out_keras", str(int8), "--format", "onnx_int8"]) == 0
    import onnx

    operators = {node.op_type for node in onnx.load(str(int8)).graph.node}
    # int8 LSTMs and dense layers; float convolutions (onnxruntime's int8 ones read slower)
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= operators and "ConvInteger" not in operators
    assert int8.stat().st_size < onnx_model.stat().st_size
    for model_path in (onnx_model, int8):  # the committed reader's images, read exactly in both
        assert [r.text for r in reader.Reader(model_path).read_paths(READER_IMAGES)] == reader_labels()


def test_int8_onnx_export_of_the_default_network_keeps_parity_and_reads_like_the_float_one(tmp_path, capsys):
    import synth

    base = ROOT / "pretrained" / "base.keras"  # the default (fast) preset, as every default run trains it
    paths = {}
    for format_ in ("onnx", "onnx_int8"):
        paths[format_] = tmp_path / f"base_{format_}.onnx"
        assert export_safe.main(["--in_keras", str(base), "--out_keras", str(paths[format_]), "--format",
                                 format_]) == 0
    assert "likeliest symbol unchanged at" in capsys.readouterr().out
    assert paths["onnx_int8"].stat().st_size < paths["onnx"].stat().st_size / 2
    images = synth.generate_synthetic(tmp_path / "captchas", 24, seed=4, workers=1, progress=False)
    readings = {f: [r.text for r in reader.Reader(p).read_paths(images)] for f, p in paths.items()}
    same = sum(a == b for a, b in zip(readings["onnx"], readings["onnx_int8"]))
    assert same >= 22, readings  # int8 reads as the float network, but for a rare unsure symbol
