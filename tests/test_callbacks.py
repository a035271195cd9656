"""callbacks.py: what a run does at each epoch's end (the weights' average, BatchNorm statistics, checkpoints,
when a run ends, the expected duration)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import callbacks
import dataset
import model
import recipes
import runstate
import runscore
import train
from conftest import DIGITS, ROOT
from charsets import Charset


def test_a_run_ends_once_its_validation_cer_holds_while_it_reads_and_not_on_the_ctc_plateau():
    crnn = model.build_model(model.PRESETS["tiny"], Charset(DIGITS).num_classes)

    def stopped_after(scores, history=(), from_epoch=0):
        """The epoch (1-based) after which StopWhenSettled(3) stops a run with these (val_cer, val_exact_match)."""
        callback = callbacks.StopWhenSettled(3, history, from_epoch)
        callback.set_model(crnn)
        crnn.stop_training = False
        for epoch, (cer, exact) in enumerate(scores):
            callback.on_epoch_end(epoch, {"val_cer": cer, "val_exact_match": exact})
            if crnn.stop_training:
                return epoch + 1
        return None

    reading = (0.0068, 0.97)
    assert stopped_after([(0.2, 0.6), reading, reading, reading, reading]) == 4  # held 3 epochs: 2, 3 and 4
    assert stopped_after([reading, (0.0061, 0.97), reading, (0.0061, 0.97), reading]) is None  # still moving
    assert stopped_after([(1.0, 0.0)] * 6) is None  # nothing read yet: the CTC plateau, which a run may leave
    assert stopped_after([(0.3, 0.5)] * 6) is None  # half read: not settled either
    assert stopped_after([reading], history=[reading, reading]) == 1  # epochs before a resume count
    # held since the first epoch, but a run stops only once 3 epochs of its clean finish (from epoch 5) held
    assert stopped_after([reading] * 8, from_epoch=4) == 7
    assert stopped_after([reading] * 6, from_epoch=4) is None  # the clean finish too short to settle: run to the end


def test_a_run_whose_validation_settles_ends_early_and_is_scored(digits_folder, tmp_path, monkeypatch, capsys):
    def settled_evaluate(*args):  # every pass reads 3 of 4 images right, with the same CER
        scores, decoded = evaluate(*args)
        return {**scores, "cer": 0.25, "exact_match": 0.75}, decoded

    evaluate = runscore.evaluate
    monkeypatch.setattr(runscore, "evaluate", settled_evaluate)
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "6", "--settle_epochs", "2",
                       "--clean_finish", "0.5", "--batch_size", "8", "--workers", "1", "--charset", "digits",
                       "--out", str(out)]) == 0
    # held from the first epoch; the clean finish is epochs 4-6, so the run ends after two of them
    assert "validation settled: CER 0.2500 for 2 epochs; stopping after epoch 5" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 5  # of 6
    assert runstate.validation_history(out / runstate.LOG_NAME) == [(0.25, 0.75)] * 5  # what a resume reads
    assert (out / runstate.BEST_NAME).exists() and (out / runstate.FINAL_NAME).exists()


def test_the_best_checkpoint_goes_to_the_later_epoch_on_a_tied_cer(tmp_path):
    path, meta = tmp_path / "best.keras", {"charset": Charset(DIGITS).to_dict()}
    crnn = model.build_model(model.PRESETS["tiny"], Charset(DIGITS).num_classes)
    for monitor, scores, expected in [("val_cer", [0.5, 0.2, 0.3, 0.2, 0.2], [0, 1, 3, 4]),
                                      ("val_loss", [0.5, 0.2, 0.3, 0.2, 0.1], [0, 1, 4])]:
        checkpoint = callbacks.BestCheckpoint(path, meta, monitor)
        checkpoint.set_model(crnn)
        written = []
        for epoch, score in enumerate(scores):
            path.unlink(missing_ok=True)
            checkpoint.on_epoch_end(epoch, {monitor: score})
            written += [epoch] if path.exists() else []
        assert written == expected and checkpoint.best == min(scores)


def test_batchnorm_statistics_are_measured_afresh_on_training_batches(samples):
    crnn = model.build_model(model.PRESETS["tiny"], Charset(DIGITS).num_classes)
    norms = [layer for layer in crnn.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:  # stale running averages, far from anything the images give
        layer.moving_mean.assign(np.full(layer.moving_mean.shape, 5.0, "float32"))
        layer.moving_variance.assign(np.full(layer.moving_variance.shape, 100.0, "float32"))
    norms[-1].trainable = False  # a frozen layer keeps its statistics
    batches = dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=3, augment="light"), workers=1)
    callback = callbacks.PreciseBatchNorm(batches, batches=2)
    callback.set_model(crnn)
    callback.on_epoch_end(0)
    images = np.concatenate([batches[0][0], batches[1][0]])  # the first two batches: 6 of the 8 images
    for layer in norms[:-1]:  # each layer's inputs at inference, after the layers before it were recomputed
        inputs = np.asarray(keras.Model(crnn.inputs, layer.input).predict_on_batch(images), np.float64)
        inputs = inputs.reshape(-1, inputs.shape[-1])
        np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), inputs.var(0), rtol=1e-3, atol=1e-6)
    assert np.all(norms[-1].moving_mean.numpy() == 5.0) and np.all(norms[-1].moving_variance.numpy() == 100.0)
    # the default recipe measures them every epoch; the reference's recipe, as the reference, does not
    assert recipes.RECIPES["default"].precise_bn_batches > 0 and recipes.RECIPES["reference"].precise_bn_batches == 0


def weights_of(crnn):
    return [keras.ops.convert_to_numpy(weight) for weight in crnn.trainable_variables]


def same_weights(first, second):
    return all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_averaged_weights_are_swapped_in_for_the_epoch_end_and_the_trained_ones_put_back(samples):
    crnn = model.build_model(model.PRESETS["tiny"], Charset(DIGITS).num_classes)
    recipe = dataclasses.replace(recipes.RECIPES["default"], ema_momentum=0.9)
    recipes.compile_model(crnn, Charset(DIGITS), recipe, total_steps=10)
    batches = dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=4), workers=1)
    for _ in range(3):
        crnn.train_on_batch(*batches[0])
    average = [keras.ops.convert_to_numpy(v) for v in crnn.optimizer._model_variables_moving_average]
    trained = weights_of(crnn)
    assert not same_weights(trained, average)  # three steps apart: the average lags the weights
    averaged = callbacks.AveragedWeights()
    for callback in (averaged, averaged.restore):
        callback.set_model(crnn)
    averaged.on_epoch_end(0)
    assert same_weights(weights_of(crnn), average)  # what validation and checkpoints see
    averaged.restore.on_epoch_end(0)
    assert same_weights(weights_of(crnn), trained)  # what training goes on from
    # off for the reference's recipe and the keras-io one, as they had it
    assert recipes.RECIPES["reference"].ema_momentum == 0 and recipes.RECIPES["kerasio"].ema_momentum == 0
    assert not recipes.make_optimizer(recipes.RECIPES["reference"], 10).use_ema


def test_a_run_validates_checkpoints_and_ends_with_the_weights_moving_average(digits_folder, tmp_path, monkeypatch,
                                                                             capsys):
    seen = []  # at each validation: the model's weights, and the optimizer's average of the trained ones

    def recording_evaluate(keras_model, *args):
        if getattr(keras_model, "optimizer", None) is not None:  # validation (the test split: a loaded model)
            average = [keras.ops.convert_to_numpy(v) for v in keras_model.optimizer._model_variables_moving_average]
            seen.append((weights_of(keras_model), average))
        return evaluate(keras_model, *args)

    trained, resumable = [], []  # each epoch's trained weights, and what its resume checkpoint saved

    def recording_swap(self, epoch, logs=None):
        swap_in(self, epoch, logs)
        trained.append(self.trained)

    def recording_save(self, finished=False):
        resumable.append(weights_of(self.model))
        save(self, finished)

    evaluate, swap_in, save = runscore.evaluate, callbacks.AveragedWeights.on_epoch_end, callbacks.ResumeCheckpoint.save
    monkeypatch.setattr(runscore, "evaluate", recording_evaluate)
    monkeypatch.setattr(callbacks.AveragedWeights, "on_epoch_end", recording_swap)
    monkeypatch.setattr(callbacks.ResumeCheckpoint, "save", recording_save)
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "3", "--batch_size", "8",
                       "--charset", DIGITS, "--ema_momentum", "0.9", "--workers", "1", "--out", str(out)]) == 0
    assert "the weights' moving average (momentum 0.9)" in capsys.readouterr().out
    assert len(seen) == 3 and all(same_weights(weights, average) for weights, average in seen)
    # a resume goes on from the weights as trained, not from their average
    assert all(same_weights(saved, weights) for saved, weights in zip(resumable[:3], trained, strict=True))
    assert not any(same_weights(saved, weights) for saved, (weights, _) in zip(resumable[:3], seen))
    final, _ = model.load_model(out / runstate.FINAL_NAME)
    assert same_weights(weights_of(final), seen[-1][0])  # no step after the last validation
    best, _ = model.load_model(out / runstate.BEST_NAME)
    assert any(same_weights(weights_of(best), weights) for weights, _ in seen)
    assert train.main(["--data_dir", str(digits_folder), "--ema_momentum", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--ema_momentum 1: from 0 (off) to below 1" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_the_weights_moving_average_trains_and_saves_under_jax(digits_folder, tmp_path):
    # Under JAX a compiled call deletes the weights' buffers it was given: the average must be copied in, not
    # shared with the optimizer's, or saving the optimizer after the next validation fails.
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "2",
         "--batch_size", "8", "--charset", DIGITS, "--ema_momentum", "0.9", "--workers", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "(jax backend)" in result.stdout and "the weights' moving average (momentum 0.9)" in result.stdout
    for name in (runstate.BEST_NAME, runstate.FINAL_NAME):
        crnn, _ = model.load_model(out / name, compile=True)
        assert crnn.optimizer.use_ema  # saved with the optimizer's average, which is readable


def test_the_expected_duration_is_stated_after_the_first_steps(capsys):
    estimate = callbacks.DurationEstimate(steps_left=1000, first=2, last=4)
    for batch in range(10):
        estimate.on_train_batch_end(batch)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("expected: about ") and "for the 1000 steps planned" in lines[0]
    assert "ms a step over steps 3-4" in lines[0]
