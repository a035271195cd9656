"""Small real folders: on-the-fly augmentation, runs sized by optimizer steps, output rows carried by symbol."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import keras
import numpy as np
import pytest

import augment
import callbacks
import dataset
import finetune
import labels as label_sources
import metrics
import model
import preprocess
import reader
import recipes
import runstate
import scoring
import synth
import train
from conftest import ROOT
from preprocess import CaptchaError, Charset, PreprocessOptions

DIGITS = "0123456789"


@pytest.fixture(scope="module")
def samples(digits_folder):
    return dataset.scan_folder(digits_folder, Charset(DIGITS), 4).samples[:8]


def batch_pixels(batches, index=0):
    return batches[index][0]


def test_augmentation_changes_training_pixels_every_epoch_and_repeats_with_the_seed(samples):
    def training_batches():
        return dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=8, shuffle=False, seed=3,
                                       workers=1, augment="light")

    batches = training_batches()
    epoch0 = batch_pixels(batches)
    assert np.array_equal(epoch0, batch_pixels(batches))  # the same epoch reads the same pixels again
    batches.on_epoch_end()
    epoch1 = batch_pixels(batches)
    plain = np.stack([preprocess.load_image(path) for path, _ in samples])
    assert epoch0.shape == epoch1.shape == plain.shape and epoch0.dtype == np.float32
    for image in range(len(samples)):  # every image is altered, and altered differently each epoch
        assert not np.array_equal(epoch0[image], plain[image])
        assert not np.array_equal(epoch0[image], epoch1[image])
    assert np.array_equal(batch_pixels(training_batches()), epoch0)  # a rerun with the seed repeats it
    assert np.array_equal(batches[0][1], training_batches()[0][1])  # labels are untouched


def test_validation_and_test_batches_are_never_augmented(samples):
    train_batches, val_batches, test_batches = dataset.split_batches(
        samples[:4], samples[4:6], samples[6:], Charset(DIGITS), 4, PreprocessOptions(), batch_size=2,
        augmentation="strong", workers=1)
    assert train_batches.augment == "strong" and train_batches.shuffle
    for batches, part in [(val_batches, samples[4:6]), (test_batches, samples[6:])]:
        assert batches.augment == "none" and not batches.shuffle
        for epoch in range(2):  # the same pixels as the plain pipeline, epoch after epoch
            assert np.array_equal(batch_pixels(batches), np.stack([preprocess.load_image(p) for p, _ in part]))
            batches.on_epoch_end()


def test_the_clean_finish_reads_the_images_as_they_are(samples):
    batches = dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=8, seed=3, workers=1, augment="light",
                                      augment_epochs=2)
    plain = np.stack([preprocess.load_image(path) for path, _ in samples])
    for epoch in range(4):  # epochs 0 and 1 altered, 2 and 3 (the clean finish) as they are
        pixels = batch_pixels(batches)
        assert np.array_equal(pixels, plain) == (epoch >= 2)
        batches.on_epoch_end()
    batches.epoch = 1  # a resumed run sets the loader's epoch: what it reads follows it
    assert not np.array_equal(batch_pixels(batches), plain)


def test_a_run_plans_its_clean_finish_from_the_recipe_or_the_flag(digits_folder, tmp_path, monkeypatch, capsys):
    loaders = []

    def keep_loaders(*args, **kwargs):
        loaders.append(split_batches(*args, **kwargs))
        return loaders[-1]

    split_batches = dataset.split_batches
    monkeypatch.setattr(dataset, "split_batches", keep_loaders)
    common = ["--data_dir", str(digits_folder), "--preset", "tiny", "--charset", "digits", "--batch_size", "16",
              "--workers", "1", "--epochs", "4"]
    assert train.main(common + ["--clean_finish", "0.5", "--out", str(tmp_path / "half")]) == 0
    assert "augmentation: light for epochs 1-2, then the images as they are" in capsys.readouterr().out
    assert loaders[-1][0].augment_epochs == 2 and loaders[-1][1].augment == loaders[-1][2].augment == "none"
    assert train.main(common + ["--out", str(tmp_path / "recipe")]) == 0  # the default recipe's quarter: 1 of 4
    assert loaders[-1][0].augment_epochs == 3 and recipes.RECIPES["default"].clean_finish == 0.25
    assert train.main(common + ["--clean_finish", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--clean_finish 1.5: a fraction of the epochs, from 0 to 1" in capsys.readouterr().err


@pytest.mark.parametrize("level", ["light", "strong"])
def test_augmentation_keeps_the_canvas_and_is_mild(level):
    gray = np.full((50, 200), 230, np.uint8)
    gray[18:32, 40:160] = 20  # a dark bar standing for the text
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = augment.augment(gray, level, rng)
        assert out.shape == gray.shape and out.dtype == np.uint8
        # the text stays inside the canvas: nothing dark within 5 pixels of the left and right edges
        assert (out[:, :5] > 120).all() and (out[:, -5:] > 120).all()
        assert (out < 120).sum() > 0.5 * (gray < 120).sum()  # and is still there
    assert augment.augment(gray, "none", rng) is gray


def test_unknown_augmentation_is_refused(samples, digits_folder, capsys):
    with pytest.raises(CaptchaError, match="unknown augmentation 'heavy'"):
        dataset.make_batches(samples, Charset(DIGITS), 4, augment="heavy")
    assert train.main(["--data_dir", str(digits_folder), "--augment", "heavy", "--preset", "tiny"]) == 2
    assert "unknown --augment 'heavy'" in capsys.readouterr().err


def test_small_folders_get_enough_optimizer_steps():
    assert recipes.plan_epochs(0, 3000, 1872, 32) == (51, 1)  # 59 steps a pass: 51 epochs, 3,009 steps
    assert recipes.plan_epochs(0, 3000, 936, 32) == (51, 2)  # 30 steps a pass: 51 epochs of 59 steps (two passes)
    assert recipes.plan_epochs(0, 3000, 400, 32) == (60, 4)  # 13 steps a pass: 60 epochs of 50 steps, 3,000 steps
    assert recipes.plan_epochs(0, 3000, 20000, 32) == (recipes.DEFAULT_EPOCHS, 1)  # 20,000 images: the usual 30
    assert recipes.plan_epochs(7, 3000, 936, 32) == (7, 1)  # --epochs given: exactly that


def test_an_epoch_of_a_small_folder_passes_over_every_image_several_times(samples):
    batches = dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=4, shuffle=True, seed=3, workers=1,
                                      augment="light", repeats=3)
    assert len(batches) == 6  # 8 images x 3 passes, 4 a batch
    order = [int(i) for i in batches.order]
    assert sorted(order) == sorted(list(range(8)) * 3)
    images = np.concatenate([batches[i][0] for i in range(len(batches))])
    first, second = [images[k] for k, i in enumerate(order) if i == 0][:2]
    assert not np.array_equal(first, second)  # the same image, altered anew in each pass


def test_a_one_cycle_run_is_never_stopped_on_patience_and_the_reference_recipe_is(capsys):
    assert callbacks.early_stopping(recipes.RECIPES["default"]) is None  # it runs its whole schedule
    reference = callbacks.early_stopping(recipes.RECIPES["reference"])
    assert reference.start_from_epoch == 0 and reference.patience == 5 and reference.monitor == "val_loss"
    assert reference.restore_best_weights
    # --patience: the recipe's unless given; given to a one-cycle run, it says it is not used
    assert recipes.with_flags("reference", patience=3).stop_patience == 3
    assert recipes.with_flags("reference").stop_patience == 5
    assert recipes.with_flags("default", patience=3).stop_patience == 3
    assert "--patience 3: not used, a one-cycle run" in capsys.readouterr().out
    assert recipes.RECIPES["default"].settle_epochs == 10  # it ends once validation has settled; the peers' never do
    assert recipes.RECIPES["reference"].settle_epochs == recipes.RECIPES["kerasio"].settle_epochs == 0


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

    evaluate = scoring.evaluate
    monkeypatch.setattr(scoring, "evaluate", settled_evaluate)
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
    batches = dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=3, workers=1, augment="light")
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


def test_a_run_with_epochs_0_plans_its_epochs_from_min_steps(digits_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(digits_folder), "--preset", "tiny", "--charset", DIGITS, "--batch_size", "16",
                       "--epochs", "0", "--min_steps", "1", "--workers", "1", "--out", str(out)]) == 0
    # 32 training images at batch 16: 2 steps a pass, so 25 passes an epoch (50 steps) and 30 passes in all
    assert "2 epochs of 50 steps = 100 optimizer steps (25 passes over the training images an epoch)" in \
        capsys.readouterr().out


def output_rows(crnn):
    kernel, bias = crnn.get_layer("softmax").get_weights()
    return kernel, bias


@pytest.mark.parametrize("source_blank", ["first", "last"])
def test_fine_tuning_carries_output_rows_over_by_symbol(source_blank):
    """Same size, other symbols: 'dcbx' keeps what 'abcd' learned for d, c, b and the blank; x starts fresh."""
    config = model.PRESETS["tiny"]
    source_charset = preprocess.charset_from_arg("abcd", source_blank)
    target_charset = Charset("dcbx")
    keras.utils.set_random_seed(1)
    source = model.build_model(config, source_charset.num_classes)
    target = model.build_model(config, target_charset.num_classes)
    fresh_kernel, fresh_bias = (w.copy() for w in output_rows(target))
    source_kernel, source_bias = output_rows(source)
    source_bias[:] = np.arange(len(source_bias))  # tell the rows apart
    source.get_layer("softmax").set_weights([source_kernel, source_bias])

    assert finetune.copy_weights_by_symbol(source, source_charset, target, target_charset) == "x"
    kernel, bias = output_rows(target)
    for symbol in "dcb":
        new, old = target_charset.encode(symbol)[0], source_charset.encode(symbol)[0]
        assert bias[new] == old and np.array_equal(kernel[:, new], source_kernel[:, old])
    assert bias[target_charset.blank_index] == source_charset.blank_index
    x = target_charset.encode("x")[0]
    assert bias[x] == fresh_bias[x] and np.array_equal(kernel[:, x], fresh_kernel[:, x])
    lstm = lambda m: m.get_layer("bilstm_1").get_weights()[0]  # noqa: E731
    assert np.array_equal(lstm(source), lstm(target))  # every other layer is copied whole


def test_fine_tuning_refuses_another_architecture():
    source = model.build_model(model.PRESETS["tiny"], 11)
    target = model.build_model(model.PRESETS["kerasio"], 11)
    with pytest.raises(CaptchaError, match="not the same architecture|weights of shapes"):
        finetune.copy_weights_by_symbol(source, Charset(DIGITS), target, Charset(DIGITS))


# ----------------------------------------------------------------------------- the shipped base model


def test_the_base_model_is_shipped_small_and_safe():
    assert finetune.BASE_MODEL.exists() and finetune.BASE_MODEL.stat().st_size <= 10 * 2**20
    base, meta = model.load_model(finetune.BASE_MODEL)  # safe mode: nothing in the file runs
    assert meta["charset"]["symbols"] == preprocess.DEFAULT_SYMBOLS and meta["max_len"] == 8
    assert model.ModelConfig.from_dict(meta["model_config"]) == model.PRESETS[finetune.BASE_PRESET]
    assert base.count_params() == model.build_model(model.PRESETS[finetune.BASE_PRESET], 63).count_params()


def test_the_base_model_reads_captchas_it_never_saw(tmp_path):
    """Zero-shot, on captchas drawn with a seed the pre-training data did not use: it has learned the symbols."""
    folder = tmp_path / "unseen"
    synth.generate_synthetic(folder, 24, seed=90210, length=5, style="gregwar", workers=1, progress=False)
    base, meta = model.load_model(finetune.BASE_MODEL)
    paths = preprocess.list_images(folder)
    images = np.stack([preprocess.load_image(p, PreprocessOptions.from_dict(meta["preprocess"])) for p in paths])
    predictions = reader.decode(base.predict_on_batch(images), Charset.from_dict(meta["charset"]))
    labels = [label_sources.label_from_filename(p) for p in paths]
    assert metrics.character_error_rate(predictions, labels) < 0.5  # an untrained network scores about 1.0


def test_runs_start_from_the_base_model_only_where_it_fits(capsys):
    assert finetune.resolve_init_from("base", "fast", "default") == finetune.BASE_MODEL
    assert finetune.resolve_init_from("none", "fast", "default") is None
    assert finetune.resolve_init_from("x.keras", "fast", "default").name == "x.keras"
    assert finetune.resolve_init_from("base", "seed", "default") is None
    assert finetune.resolve_init_from("base", "fast", "reference") is None
    assert "not used, the base model is a 'fast' network" in capsys.readouterr().out


def test_the_default_run_fine_tunes_the_base_model(digits_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(digits_folder), "--epochs", "1", "--batch_size", "16", "--workers", "1",
                       "--out", str(out)]) == 0
    assert f"starting from {finetune.BASE_MODEL} (every symbol's output row carried over)" in capsys.readouterr().out
    tuned, meta = model.load_model(out / runstate.FINAL_NAME)
    assert meta["charset"]["symbols"] == DIGITS and tuned.output_shape == (None, 50, 11)


def test_augmentation_picture_shows_the_loaders_own_output(tmp_path):
    import plots

    image = synth.generate_synthetic(tmp_path / "img", 1, seed=2, workers=1, progress=False)[0]
    plain = tmp_path / "plain.png"
    assert plots.main(["--augmentation", str(plain), str(image)]) == 0
    from PIL import Image

    with Image.open(plain) as picture:
        pixels = np.asarray(picture.convert("L"), dtype=np.float32)
    columns = np.array_split(pixels, 7, axis=1)  # as read, 3 x light, 3 x strong
    assert all(np.abs(columns[0] - column).mean() > 1.0 for column in columns[1:])  # every epoch's panel differs


def weights_of(crnn):
    return [keras.ops.convert_to_numpy(weight) for weight in crnn.trainable_variables]


def same_weights(first, second):
    return all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_averaged_weights_are_swapped_in_for_the_epoch_end_and_the_trained_ones_put_back(samples):
    crnn = model.build_model(model.PRESETS["tiny"], Charset(DIGITS).num_classes)
    recipe = dataclasses.replace(recipes.RECIPES["default"], ema_momentum=0.9)
    recipes.compile_model(crnn, Charset(DIGITS), recipe, total_steps=10)
    batches = dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=4, workers=1)
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

    evaluate, swap_in, save = scoring.evaluate, callbacks.AveragedWeights.on_epoch_end, callbacks.ResumeCheckpoint.save
    monkeypatch.setattr(scoring, "evaluate", recording_evaluate)
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


def test_the_built_in_run_on_a_cpu_is_sized_in_steps():
    assert recipes.cpu_builtin_epochs(16000, 32) == 6  # 500 steps an epoch: 3,000 steps
    assert recipes.cpu_builtin_epochs(100, 32) == 750  # 4 steps an epoch
    assert recipes.cpu_builtin_epochs(10**6, 32) == 1


def test_the_expected_duration_is_stated_after_the_first_steps(capsys):
    estimate = callbacks.DurationEstimate(steps_left=1000, first=2, last=4)
    for batch in range(10):
        estimate.on_train_batch_end(batch)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("expected: about ") and "for the 1000 steps planned" in lines[0]
    assert "ms a step over steps 3-4" in lines[0]


def test_a_loader_set_to_an_epoch_gives_the_batches_of_an_unbroken_run(samples):
    """What --resume relies on: the order and the augmentation are drawn from (seed, epoch), so a loader told
    the epoch reads what one that went through the epochs before it reads."""
    def loader():
        return dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=4, shuffle=True, seed=3, workers=1,
                                    augment="light", in_memory=True)

    unbroken, resumed = loader(), loader()
    for _ in range(3):
        unbroken.on_epoch_end()
    resumed.epoch = 3
    for index in range(len(unbroken)):
        (a, labels_a), (b, labels_b) = unbroken[index], resumed[index]
        assert np.array_equal(a, b) and np.array_equal(labels_a, labels_b)
    epoch_0 = loader()
    assert not np.array_equal(epoch_0.order, unbroken.order)  # another epoch, another order


def test_canvases_in_memory_give_the_pixels_read_from_disk(samples):
    streamed = dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=4, shuffle=True, seed=3, workers=1,
                                    augment="light")
    cached = dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=4, shuffle=True, seed=3, workers=1,
                                  augment="light", in_memory=True)
    assert streamed.canvases is None and cached.canvases.shape == (len(samples), 50, 200)
    for index in range(len(streamed)):
        assert np.array_equal(streamed[index][0], cached[index][0])


@pytest.mark.parametrize("in_memory", [True, False], ids=["canvases_in_memory", "streamed"])
def test_worker_processes_make_the_batches_threads_make(samples, in_memory):
    def loader(processes):
        return dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=3, shuffle=True, seed=3, workers=2,
                                    augment="light", in_memory=in_memory, processes=processes)

    threads, processes = loader(0), loader(2)
    try:
        for epoch in (0, 2):
            threads.epoch = processes.epoch = epoch
            for index in range(len(threads)):
                (a, labels_a), (b, labels_b) = threads[index], processes[index]
                assert np.array_equal(a, b) and np.array_equal(labels_a, labels_b)
    finally:
        processes.close()
    assert processes.processes is None


def test_worker_processes_hand_each_batch_back_whole_when_many_threads_ask_at_once(samples):
    """Each batch comes back through a slot of shared memory: with more threads asking than slots, none may
    read a slot another batch is being written into."""
    def loader(processes):
        return dataset.make_batches(samples, Charset(DIGITS), 4, batch_size=2, shuffle=True, seed=5, workers=2,
                                    augment="light", processes=processes)

    threads, processes = loader(0), loader(2)
    try:
        with ThreadPoolExecutor(6) as pool:  # 6 callers, 2 slots
            made = list(pool.map(processes.__getitem__, [i for _ in range(4) for i in range(len(processes))]))
        for k, (images, labels) in enumerate(made):
            expected_images, expected_labels = threads[k % len(threads)]
            assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
    finally:
        processes.close()


def test_worker_processes_without_the_shared_memory_they_need_are_refused_in_one_line(digits_folder, tmp_path,
                                                                                      monkeypatch, capsys):
    # a default Docker container's /dev/shm: 64 MiB; a write past it would kill the run with SIGBUS
    monkeypatch.setattr(dataset.shutil, "disk_usage", lambda folder: SimpleNamespace(free=64 * 2**20))
    args = ["--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "1", "--batch_size", "512",
            "--processes", "2", "--workers", "16", "--out", str(tmp_path / "run")]
    assert train.main(args) == 2
    error = capsys.readouterr().err
    assert "--processes: the worker processes need" in error and "/dev/shm has 64 MiB free" in error
    assert "Traceback" not in error
    dataset.check_shared_memory(64 * 2**20)  # what fits is let through
