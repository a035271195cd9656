"""runscore.py: the threshold every model stores, and which of a run's checkpoints is kept."""

import json

import pytest

import dataset
import metrics
import model
import modelmeta
import runstate
import runscore
from conftest import READER, READER_IMAGES
from charsets import Charset
from preprocess import PreprocessOptions


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


def test_the_stored_threshold_is_chosen_without_readings_no_reader_would_trust(four_symbol_reader):
    keras_path, _ = four_symbol_reader
    crnn, meta = model.load_model(keras_path)
    charset = Charset.from_dict(meta["charset"])
    samples = [(path, path.stem) for path in READER_IMAGES]
    options = PreprocessOptions.from_dict(meta["preprocess"])
    batches = dataset.make_batches(samples, charset, meta["max_len"], dataset.Batching(options=options, batch_size=8))
    abstain, _ = runscore.store_abstention(keras_path, batches, [label for _, label in samples], charset, 0.99, crnn)
    four = sum(len(path.stem) == 4 for path in READER_IMAGES)
    assert 0 < four < len(READER_IMAGES)
    # every reading is right, so every reading of an allowed length is kept, and none of another length
    assert abstain["val_coverage"] == four / len(READER_IMAGES) and abstain["val_precision"] == 1.0
    assert modelmeta.read_meta(keras_path)["abstain"] == abstain


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
    kept, counts = runscore.keep_final_unless_lowest_is_better(out, labels, labels, misread)
    assert kept == "final" and (counts["lowest_val_cer_right"], counts["final_right"]) == (20, 16)
    assert modelmeta.read_meta(out / runstate.BEST_NAME)["tag"] == "final"  # what every reader reads by default
    assert modelmeta.read_meta(out / runstate.LOWEST_VAL_NAME)["tag"] == "lowest"  # kept, not lost
    # scored again (a stop during scoring): the swap is not repeated, the lowest-CER checkpoint stays what it was,
    # and the counts are those of the first scoring (the run's model now reads validation as the final one)
    assert runscore.keep_final_unless_lowest_is_better(out, labels, misread, misread) == ("final", counts)
    assert modelmeta.read_meta(out / runstate.LOWEST_VAL_NAME)["tag"] == "lowest"
    # 5 of 20 the final epoch misreads: p = 0.031, the lowest-CER checkpoint stays the run's model
    out = run_with_two_checkpoints(tmp_path / "better")
    (out / runstate.LOWEST_VAL_NAME).write_bytes(b"an earlier run's")
    kept, _ = runscore.keep_final_unless_lowest_is_better(out, labels, labels, ["x"] * 5 + labels[5:])
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
