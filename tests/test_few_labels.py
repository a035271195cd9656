"""Few labels: the confidence threshold every model stores and every reader applies, and self-training on a
folder of unlabelled captchas (pseudo-labels in the training split only, resumable by round)."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_serve import call, multipart, serving

import dataset
import export_safe
import labels as label_sources
import metrics
import model
import modelmeta
import reader
import runstate
import scoring
import selftrain
import test as read_captchas  # the project's test.py (reads captchas), not a test module
import train
from conftest import READER, READER_IMAGES, ROOT, as_unlabelled, run_stopped_while_round_one_is_scored
from preprocess import Charset, PreprocessOptions

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from make_reader import draw_folder  # noqa: E402  (the fixture reader's own look: it reads these)

# ----------------------------------------------------------------------------- the stored threshold


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("precision", [0.8, 0.95, 0.99])
def test_the_threshold_reaches_its_precision_on_the_split_it_was_chosen_on(seed, precision):
    rng = np.random.default_rng(seed)
    confidences = np.round(rng.random(300), 2)  # ties, as real confidences have after rounding
    correct = rng.random(300) < 0.3 + 0.7 * confidences  # the confident ones are right more often
    chosen = metrics.abstention_threshold(correct, confidences, precision)
    kept = metrics.abstention_scores(correct, confidences, chosen["threshold"])
    assert kept["precision"] >= precision and kept["precision"] == pytest.approx(chosen["precision"])
    assert kept["coverage"] == pytest.approx(chosen["coverage"]) and 0 < kept["coverage"] < 1
    lower = confidences[confidences < chosen["threshold"]].max()  # the next cut down misses the precision
    assert metrics.abstention_scores(correct, confidences, lower)["precision"] < precision


def test_no_threshold_when_the_most_confident_reading_is_wrong():
    chosen = metrics.abstention_threshold([False, True], [0.9, 0.8], 0.99)
    assert chosen["threshold"] is None and chosen["coverage"] == 0
    assert metrics.abstention_scores([False, True], [0.9, 0.8], None) == {"coverage": 0.0, "precision": None,
                                                                          "count": 2}


def test_every_trained_model_stores_its_threshold_and_metrics_report_it_on_test(trained_run):
    results = json.loads((trained_run / "metrics.json").read_text())
    abstain = results["abstain"]
    for name in (runstate.BEST_NAME, runstate.FINAL_NAME):
        stored = modelmeta.read_meta(trained_run / name)["abstain"]
        assert stored["target_precision"] == 0.99 and stored["val_count"] == 4
    assert {k: abstain[k] for k in stored} == modelmeta.read_meta(trained_run / runstate.BEST_NAME)["abstain"]
    readings = results["readings"]
    correct = [r["truth"] == r["prediction"] for r in readings]
    on_test = metrics.abstention_scores(correct, [r["confidence"] for r in readings], abstain["threshold"])
    assert abstain["test_coverage"] == pytest.approx(on_test["coverage"])


@pytest.fixture(scope="module")
def thresholded_reader(tmp_path_factory):
    """The committed reader with a stored threshold between its images' confidences, as .keras and .onnx."""
    folder = tmp_path_factory.mktemp("thresholded")
    path = folder / "reader.keras"
    shutil.copy(READER, path)
    confidences = sorted(reading.confidence for reading in reader.Reader(READER).read_paths(READER_IMAGES))
    threshold = (confidences[3] + confidences[4]) / 2  # four readings below it, four above
    model.update_meta(path, {"abstain": {"target_precision": 0.99, "threshold": threshold, "val_precision": 1.0,
                                         "val_coverage": 0.5, "val_count": 8}})
    onnx_path = folder / "reader.onnx"
    assert export_safe.main(["--in_keras", str(path), "--out_keras", str(onnx_path), "--format", "onnx"]) == 0
    return path, folder / "reader.onnx", threshold


def test_a_stored_threshold_keeps_the_weights_and_is_applied_by_keras_and_onnx_readers(thresholded_reader):
    keras_path, onnx_path, threshold = thresholded_reader
    weights = [model.load_model(path)[0].get_weights() for path in (keras_path, READER)]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    for path in (keras_path, onnx_path):
        assert reader.Reader(path).low_confidence_rule().threshold == threshold
        assert reader.Reader(path).low_confidence_rule(0.25).threshold == 0.25  # --min_confidence overrides
    assert reader.Reader(READER).low_confidence_rule().threshold == 0.0  # a model without one marks none by it


def test_test_py_marks_low_readings_by_the_stored_threshold_unless_told(thresholded_reader, tmp_path, capsys):
    keras_path, _, threshold = thresholded_reader
    output = tmp_path / "readings.json"
    assert read_captchas.main(["--model", str(keras_path), "--folder", str(READER_IMAGES[0].parent),
                               "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["readings"]
    assert [row["low_confidence"] for row in rows] == [row["confidence"] < threshold for row in rows]
    assert sum(row["low_confidence"] for row in rows) == 4
    assert "4 of 8 readings marked low" in capsys.readouterr().out
    assert read_captchas.main(["--model", str(keras_path), "--folder", str(READER_IMAGES[0].parent),
                               "--output", str(output), "--min_confidence", "0"]) == 0
    assert not any(row["low_confidence"] for row in json.loads(output.read_text())["readings"])


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


def test_ineligible_readings_are_never_kept_by_a_threshold():
    correct, confidences = [False, True, True, True], [0.99, 0.9, 0.8, 0.7]
    assert metrics.abstention_threshold(correct, confidences, 0.99)["threshold"] is None  # the top one is wrong
    eligible = [False, True, True, True]  # ... but of a length no typed label has: marked low by every reader
    chosen = metrics.abstention_threshold(correct, confidences, 0.99, eligible)
    assert chosen == {"threshold": 0.7, "precision": 1.0, "coverage": 0.75, "count": 4}
    assert metrics.abstention_scores(correct, confidences, 0.7, eligible) == {"coverage": 0.75, "precision": 1.0,
                                                                             "count": 4}


@pytest.fixture(scope="module")
def four_symbol_reader(tmp_path_factory):
    """The committed reader told that people typed it labels of 4 symbols only, as .keras and .onnx: of the
    fixture images it reads right, those of 3 symbols are of a length no typed label has."""
    folder = tmp_path_factory.mktemp("four_symbols")
    path = folder / "reader.keras"
    shutil.copy(READER, path)
    model.update_meta(path, {"label_lengths": [4, 4]})
    assert export_safe.main(["--in_keras", str(path), "--out_keras", str(folder / "reader.onnx"), "--format",
                             "onnx"]) == 0
    return path, folder / "reader.onnx"


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


def test_the_stored_threshold_is_chosen_without_readings_no_reader_would_trust(four_symbol_reader):
    keras_path, _ = four_symbol_reader
    crnn, meta = model.load_model(keras_path)
    charset = Charset.from_dict(meta["charset"])
    samples = [(path, path.stem) for path in READER_IMAGES]
    options = PreprocessOptions.from_dict(meta["preprocess"])
    batches = dataset.make_batches(samples, charset, meta["max_len"], options=options, batch_size=8)
    abstain, _ = scoring.store_abstention(keras_path, batches, [label for _, label in samples], charset, 0.99, crnn)
    four = sum(len(path.stem) == 4 for path in READER_IMAGES)
    assert 0 < four < len(READER_IMAGES)
    # every reading is right, so every reading of an allowed length is kept, and none of another length
    assert abstain["val_coverage"] == four / len(READER_IMAGES) and abstain["val_precision"] == 1.0
    assert modelmeta.read_meta(keras_path)["abstain"] == abstain


# ----------------------------------------------------------------------------- self-training


def test_one_validation_error_is_not_evidence_but_many_are():
    assert not metrics.better_beyond_chance([True] * 20, [True] * 19 + [False])  # p = 0.5
    assert not metrics.better_beyond_chance([True] * 20, [True] * 16 + [False] * 4)  # p = 0.0625
    assert metrics.better_beyond_chance([True] * 20, [True] * 15 + [False] * 5)  # p = 0.03125
    assert not metrics.better_beyond_chance([True] * 15 + [False] * 5, [True] * 20)  # one-sided
    # paired: each reads right where the other errs as often, so neither is better
    assert not metrics.better_beyond_chance([True, False] * 10, [False, True] * 10)


def run_with_two_checkpoints(out):
    """A run folder whose lowest-validation-CER checkpoint and final model are the committed reader, told apart by
    a tag in their metadata."""
    out.mkdir()
    model.copy_with_meta(READER, out / runstate.BEST_NAME, {"tag": "lowest"})
    model.copy_with_meta(READER, out / runstate.FINAL_NAME, {"tag": "final"})
    return out


def test_the_final_model_is_kept_unless_the_lowest_validation_cer_checkpoint_is_better_beyond_chance(tmp_path):
    labels = [f"{i:04d}" for i in range(20)]
    misread = ["x"] * 4 + labels[4:]
    # the lowest-CER epoch read all 20 validation images, the final one 16: p = 0.0625, one epoch's luck
    out = run_with_two_checkpoints(tmp_path / "luck")
    kept, counts = scoring.keep_final_unless_lowest_is_better(out, labels, labels, misread)
    assert kept == "final" and (counts["lowest_val_cer_right"], counts["final_right"]) == (20, 16)
    assert modelmeta.read_meta(out / runstate.BEST_NAME)["tag"] == "final"  # what every reader reads by default
    assert modelmeta.read_meta(out / runstate.LOWEST_VAL_NAME)["tag"] == "lowest"  # kept, not lost
    # scored again (a stop during scoring): the swap is not repeated, the lowest-CER checkpoint stays what it was,
    # and the counts are those of the first scoring (the run's model now reads validation as the final one)
    assert scoring.keep_final_unless_lowest_is_better(out, labels, misread, misread) == ("final", counts)
    assert modelmeta.read_meta(out / runstate.LOWEST_VAL_NAME)["tag"] == "lowest"
    # 5 of 20 the final epoch misreads: p = 0.031, the lowest-CER checkpoint stays the run's model
    out = run_with_two_checkpoints(tmp_path / "better")
    (out / runstate.LOWEST_VAL_NAME).write_bytes(b"an earlier run's")
    kept, _ = scoring.keep_final_unless_lowest_is_better(out, labels, labels, ["x"] * 5 + labels[5:])
    assert kept == "best checkpoint" and modelmeta.read_meta(out / runstate.BEST_NAME)["tag"] == "lowest"
    assert not (out / runstate.LOWEST_VAL_NAME).exists()


def test_a_one_cycle_run_reports_which_model_it_kept(trained_run):
    results = json.loads((trained_run / "metrics.json").read_text())
    kept = results["kept"]
    assert kept["val_count"] == 4 and kept["model"] in ("final", "best checkpoint")
    best_meta = modelmeta.read_meta(trained_run / runstate.BEST_NAME)
    assert ("kept" in best_meta) == (kept["model"] == "final")
    assert (trained_run / runstate.LOWEST_VAL_NAME).exists() == (kept["model"] == "final")
    val_right = sum(r["truth"] == r["prediction"] for r in results["val_readings"])  # the kept model's readings
    assert val_right == kept["final_right" if kept["model"] == "final" else "lowest_val_cer_right"]


def write_round(out, number, wrong, count=20):
    """A self-training round's metrics.json whose best model misreads the first `wrong` of `count` validation images."""
    folder = selftrain.round_dir(out, number)
    folder.mkdir(parents=True)
    readings = [{"path": f"val/{i:02d}.png", "truth": "abcde", "prediction": "abcdx" if i < wrong else "abcde"}
                for i in range(count)]
    (folder / "metrics.json").write_text(json.dumps({"val_readings": readings}))
    return {"round": number, "val_cer": wrong / (5 * count)}


def test_self_training_keeps_the_last_round_unless_an_earlier_one_reads_validation_better_beyond_chance(tmp_path):
    # round 0 read all 20 validation images, round 1 missed one: noise, so round 1 (more training data) is kept
    summaries = [write_round(tmp_path / "a", 0, wrong=0), write_round(tmp_path / "a", 1, wrong=1)]
    assert selftrain.choose_round(tmp_path / "a", summaries)[0]["round"] == 1
    # round 1 misses 6 that round 0 reads: beyond chance, round 0 is kept
    summaries = [write_round(tmp_path / "b", 0, wrong=0), write_round(tmp_path / "b", 1, wrong=6),
                 write_round(tmp_path / "b", 2, wrong=7)]
    chosen, why = selftrain.choose_round(tmp_path / "b", summaries)
    assert chosen["round"] == 0 and "beyond chance" in why


def test_pseudo_labelled_copies_of_labelled_images_are_left_out(tmp_path):
    draw_folder(tmp_path / "labelled", 4, seed=3)
    labelled = [(path, path.stem) for path in sorted((tmp_path / "labelled").iterdir())]
    (tmp_path / "unlabelled").mkdir()
    shutil.copy(labelled[0][0], tmp_path / "unlabelled" / "copy.png")
    draw_folder(tmp_path / "other", 2, seed=4)
    others = [(path, path.stem) for path in sorted((tmp_path / "other").iterdir())]
    pseudo = [(tmp_path / "unlabelled" / "copy.png", "1"), *others]
    kept, copies = selftrain.without_labelled_copies(pseudo, labelled)
    assert copies == 1 and kept == pseudo[1:]


def test_readings_of_a_length_no_typed_label_has_are_no_pseudo_labels(tmp_path):
    lengths = {len(path.stem) for path in READER_IMAGES}
    assert lengths == {3, 4}  # the fixture images: both lengths, each read right by the reader
    path = tmp_path / "reader.keras"
    shutil.copy(READER, path)
    for typed, kept_lengths in (([4, 4], {4}), ([3, 4], {3, 4})):
        model.update_meta(path, {"label_lengths": typed})
        kept, unreadable, wrong_length, known_wrong = selftrain.pseudo_label(path, READER_IMAGES)
        assert [(Path(p).name, text) for p, text, _ in kept] == [
            (image.name, image.stem) for image in READER_IMAGES if len(image.stem) in kept_lengths]
        assert unreadable == 0 and wrong_length == len(READER_IMAGES) - len(kept) and known_wrong == 0


def test_readings_the_site_rejected_are_no_pseudo_labels(tmp_path):
    """serve.py --collect files a rejected reading in rejected/readings.csv; self-training on that folder never
    takes the same reading as a pseudo-label (another reading of the image may still be one)."""
    folder = tmp_path / "rejected"
    folder.mkdir()
    for image in READER_IMAGES:
        shutil.copy(image, folder / image.name)
    first, second = READER_IMAGES[0], READER_IMAGES[1]
    with open(folder / label_sources.REJECTED_READINGS_NAME, "w", encoding="utf-8") as f:
        f.write(f"{first.name},{first.stem}\n{second.name},{second.stem[::-1]}x\n")  # the reader's reading; another
    assert label_sources.rejected_readings(folder) == {first.name: first.stem, second.name: second.stem[::-1] + "x"}
    paths = [folder / image.name for image in READER_IMAGES]
    kept, _, _, known_wrong = selftrain.pseudo_label(READER, paths,
                                                     rejected=label_sources.rejected_readings(folder))
    assert known_wrong == 1 and first.name not in {Path(p).name for p, _, _ in kept}
    assert second.name in {Path(p).name for p, _, _ in kept}
    assert label_sources.rejected_readings(tmp_path) == {}  # no readings file: nothing rejected


def test_rounds_go_on_while_the_pseudo_labels_change():
    before = [("a.png", "12"), ("b.png", "34"), ("c.png", "56")]
    assert selftrain.changed_pseudo_labels(before, before) == 0
    assert selftrain.changed_pseudo_labels(before, before[:2]) == 1  # c.png no longer labelled: trained without
    assert selftrain.changed_pseudo_labels(before, [("a.png", "12"), ("b.png", "84"), ("d.png", "7")]) == 3
    assert selftrain.changed_pseudo_labels([], before) == 3
    assert selftrain.changed_pseudo_labels([(Path("a.png"), "12")], [("a.png", "12")]) == 0  # paths as str or Path


@pytest.fixture(scope="module")
def few_and_unlabelled(tmp_path_factory):
    """60 labelled images of the fixture reader's look, and 120 more under numbers, with their truth; one of
    them a copy of a labelled image."""
    root = tmp_path_factory.mktemp("few")
    draw_folder(root / "labelled", 60, seed=21)
    draw_folder(root / "drawn", 120, seed=22)
    unlabelled = root / "unlabelled"
    truth = as_unlabelled(root / "drawn", unlabelled)
    shutil.copy(sorted((root / "labelled").iterdir())[0], unlabelled / "copy.png")
    return root / "labelled", unlabelled, truth


def test_self_training_adds_confident_readings_to_training_only_and_resumes_in_its_round(few_and_unlabelled,
                                                                                         tmp_path, monkeypatch, capsys):
    labelled, unlabelled, truth = few_and_unlabelled
    out = tmp_path / "run"
    flags = ["--data_dir", str(labelled), "--unlabeled", str(unlabelled), "--init_from", str(READER), "--epochs", "2",
             "--rounds", "1", "--workers", "1", "--out", str(out)]
    calls = run_stopped_while_round_one_is_scored(monkeypatch, flags)
    printed = capsys.readouterr().out
    assert f"python train.py --resume --out {out}\n" in printed and "Traceback" not in printed
    assert calls == [out / "round_0", out / "round_1"]
    round_zero = (out / "round_0" / "metrics.json").stat().st_mtime_ns
    typed = [len(path.stem) for path in labelled.iterdir()]
    assert modelmeta.read_meta(out / "round_0" / runstate.BEST_NAME)["label_lengths"] == [min(typed), max(typed)]
    with open(selftrain.pseudo_labels_path(out, 1)) as f:
        pseudo = list(csv.DictReader(f))
    right = [truth.get(row["path"].rsplit("/", 1)[-1]) == row["label"] for row in pseudo]
    assert len(pseudo) >= 60 and np.mean(right) >= 0.95  # the reader reads its look well: most, and right
    assert all(row["path"].startswith(str(unlabelled)) for row in pseudo)
    assert float(min(row["confidence"] for row in pseudo)) >= modelmeta.read_meta(
        out / "round_0" / runstate.BEST_NAME)["abstain"]["threshold"]

    assert train.main(["--resume", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "self-training round 1: resumed" in printed and "round 0: resumed" not in printed
    assert "copies of labelled images: left out" in printed
    assert (out / "round_0" / "metrics.json").stat().st_mtime_ns == round_zero  # round 0 was not run again
    results = json.loads((out / "metrics.json").read_text())
    rounds = results["self_training"]["rounds"]
    assert [r["pseudo_labels"] for r in rounds] == [0, len(pseudo)]
    for summary in rounds:  # each round as its kept model reads validation, not its log's lowest-CER epoch
        val = json.loads((out / f"round_{summary['round']}" / "metrics.json").read_text())["val_readings"]
        assert summary["val_exact_match"] == np.mean([r["truth"] == r["prediction"] for r in val])
    tests = [json.loads((out / f"round_{n}" / "metrics.json").read_text())["readings"] for n in (0, 1)]
    assert [r["path"] for r in tests[0]] == [r["path"] for r in tests[1]]  # the same labelled test split
    assert all(r["path"].startswith(str(labelled)) for r in tests[1])
    chosen = out / f"round_{results['self_training']['chosen_round']}"
    assert (out / runstate.BEST_NAME).read_bytes() == (chosen / runstate.BEST_NAME).read_bytes()
    assert not (out / "round_1" / runstate.RESUME_NAME).exists()

    round_one = (out / "round_1" / "metrics.json").stat().st_mtime_ns
    assert train.main(["--resume", "--out", str(out), "--rounds", "2"]) == 0  # the finished run, a round more
    printed = capsys.readouterr().out
    assert "--rounds 2 over the run's 1" in printed
    assert (out / "round_0" / "metrics.json").stat().st_mtime_ns == round_zero
    assert (out / "round_1" / "metrics.json").stat().st_mtime_ns == round_one
    assert selftrain.pseudo_labels_path(out, 2).exists()  # round 1's model read the unlabelled images
    assert "self-training round 2: started" in printed or "self-training ends: round 2's" in printed
    assert json.loads((out / selftrain.STATE_NAME).read_text())["config"]["rounds"] == 2  # a later --resume too
