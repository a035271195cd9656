"""The four scripts end to end: train.py, test.py, export_safe.py, `synth.py`."""

import csv
import importlib
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import dataset
import export_safe
import labels as label_sources
import model
import modelmeta
import preprocess
import reader
import runstate
import synth
import test as read_captchas  # the project's test.py (reads captchas), not a test module
import train
from conftest import READER, READER_IMAGES, ROOT, reader_labels
from preprocess import Charset

TINY = model.PRESETS["tiny"]


def run_script(*args):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


# ----------------------------------------------------------------------------- train.py


def test_training_writes_both_checkpoints_log_and_test_metrics(trained_run):
    best, meta = model.load_model(trained_run / runstate.BEST_NAME)
    final, _ = model.load_model(trained_run / runstate.FINAL_NAME)
    assert meta["charset"] == {"symbols": "0123456789", "blank_index": 0}
    assert meta["max_len"] == 4 and meta["preprocess"]["auto_crop"] is False
    assert best.output_shape == final.output_shape == (None, 50, 11)
    with open(trained_run / "train_log.csv") as f:
        log = list(csv.DictReader(f))
    assert len(log) == 3 and {"loss", "val_loss", "val_exact_match", "val_cer"} <= set(log[0])
    losses = [float(row["loss"]) for row in log]
    assert losses[-1] < losses[0]  # gradients flow end to end
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["test"]["count"] == 4  # 10% of 40 images, never seen in training or selection
    assert 0 <= metrics["test"]["exact_match"] <= 1 and 0 <= metrics["test"]["cer"]
    assert metrics["epochs_run"] == 3 and len(metrics["examples"]) == 4


def test_training_plots_are_real_pictures_of_this_run(trained_run):
    from PIL import Image

    import plots

    for name in ["training_curves.png", "predictions.png", "confusions.png"]:
        with Image.open(trained_run / name) as picture:
            assert picture.format == "PNG" and picture.width > 300 and picture.height > 100
    rows = plots.read_log(trained_run / "train_log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # the curves' data is this run's own history
    examples = json.loads((trained_run / "metrics.json").read_text())["examples"]
    truths, predictions = [e["truth"] for e in examples], [e["prediction"] for e in examples]
    assert sum(n for _, n in plots.confusions(truths, predictions, top=100)) <= sum(len(t) for t in truths)


def test_plots_command_redraws_a_finished_run(trained_run, tmp_path):
    import shutil

    import plots

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"]["batch_size"] = 0  # as a run that took the recipe's batch size records it
    (run / "metrics.json").write_text(json.dumps(metrics))
    for name in ["training_curves.png", "predictions.png", "confusions.png"]:
        (run / name).unlink()
    assert plots.main([str(run)]) == 0
    for name in ["training_curves.png", "predictions.png", "confusions.png"]:
        assert (run / name).stat().st_size > 1000
    assert plots.main([str(tmp_path / "nothing")]) == 2


def test_plots_command_draws_the_runs_own_readings(trained_run, digits_folder, tmp_path, capsys):
    """plots.py RUN draws what the run wrote (its test readings, its checkpoint's preprocessing), not a rescan."""
    import shutil

    import plots

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(digits_folder, data)
    shutil.copytree(trained_run, run)
    results = json.loads((run / "metrics.json").read_text())
    for reading in results["readings"]:
        reading["path"] = str(data / Path(reading["path"]).name)
    (run / "metrics.json").write_text(json.dumps(results))
    assert plots.main([str(run)]) == 0
    drawn = (run / "predictions.png").read_bytes()
    results["readings"][0]["prediction"] += "9"  # another reading of the first test image
    (run / "metrics.json").write_text(json.dumps(results))
    assert plots.main([str(run)]) == 0
    assert (run / "predictions.png").read_bytes() != drawn  # the picture follows the run's readings
    gone = Path(results["readings"][0]["path"])
    gone.unlink()
    assert plots.main([str(run)]) == 2
    assert f"{gone}: cannot read file" in capsys.readouterr().err


def test_confusions_count_substitutions_only():
    import plots

    assert plots.confusions(["abcde", "abcde", "xyz"], ["abXde", "abXd", "xyz"]) == [(("c", "X"), 2)]


def test_training_and_inference_see_the_same_pixels(trained_run, digits_folder):
    model_path = trained_run / runstate.BEST_NAME
    _, meta = model.load_model(model_path)
    samples = dataset.scan_folder(digits_folder).samples[:4]
    charset = Charset.from_dict(meta["charset"])
    training_options = preprocess.PreprocessOptions.from_dict(meta["preprocess"])
    train_images, _ = dataset.make_batches(samples, charset, 4, options=training_options, batch_size=4, workers=1)[0]
    as_read = reader.Reader(model_path)  # what test.py and serve.py read with, without flags
    for (path, _), train_image in zip(samples, train_images):
        test_image, error = as_read.prepare(path)
        assert error is None and np.array_equal(test_image, train_image)
    # and the flags do change them
    changed, _ = reader.Reader(model_path, strong=True).prepare(samples[0][0])
    assert not np.array_equal(changed, train_images[0])


def test_time_steps_are_checked_against_label_length():
    with pytest.raises(preprocess.CaptchaError, match="time steps"):
        model.check_time_steps(model.time_steps(model.ModelConfig(width=16)), 5)


def test_built_in_data_is_drawn_once_and_cached(tmp_path, capsys):
    args = ["--synth_dir", str(tmp_path / "synth"), "--preset", "tiny", "--epochs", "1", "--workers", "1",
            "--out", str(tmp_path / "out")]
    assert train.main(args + ["--synth_count", "30"]) == 0
    drawn = {p: p.stat().st_mtime_ns for p in preprocess.list_images(tmp_path / "synth" / "captcha")}
    assert len(drawn) == 30 and "drawing 30 synthetic captchas" in capsys.readouterr().out
    assert train.main(args + ["--synth_count", "20"]) == 0
    printed = capsys.readouterr().out
    assert "drawing" not in printed and "split 16 train / 2 val / 2 test" in printed  # a subset of the cache
    assert {p: p.stat().st_mtime_ns for p in preprocess.list_images(tmp_path / "synth" / "captcha")} == drawn


def test_training_on_an_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    assert_one_line_error(run_script("train.py", "--data_dir", tmp_path, "--out", tmp_path / "out"),
                          str(tmp_path), "no usable labelled images")


# ----------------------------------------------------------------------------- test.py


def expected_texts(model_path, paths):
    crnn, meta = model.load_model(model_path)
    options = preprocess.PreprocessOptions.from_dict(meta["preprocess"])
    images = np.stack([preprocess.load_image(p, options) for p in paths])
    return reader.decode(crnn.predict_on_batch(images), Charset.from_dict(meta["charset"]))


def test_read_one_image(capsys):
    image = READER_IMAGES[0]
    assert read_captchas.main(["--model", str(READER), "--image", str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{image} -> {image.stem} (")  # the committed reader reads it exactly
    assert lines[1].startswith("1 labelled image: exact match 1.0000")


def test_read_a_folder_with_limit_csv_debug_and_a_broken_file(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    images = READER_IMAGES[:5]
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "00000.png").write_bytes(b"broken")  # sorts first; must not stop the rest
    code = read_captchas.main(["--model", str(READER), "--folder", str(folder), "--limit", "5", "--batch_size", "2",
                               "--output", str(tmp_path / "out.csv"), "--save_debug", str(tmp_path / "debug")])
    assert code == 0
    captured = capsys.readouterr()
    assert "00000.png: not a readable image" in captured.err
    predicted = [line.rsplit(" (", 1)[0] for line in captured.out.splitlines() if " -> " in line]  # less confidence
    readable = sorted(folder / image.name for image in images)[:4]
    truths = [p.stem for p in readable]  # the committed reader reads them exactly
    assert predicted == [f"{path} -> {text}" for path, text in zip(readable, truths)]
    assert "4 labelled images: exact match 1.0000" in captured.out
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["prediction"] for row in rows] == truths and [row["label"] for row in rows] == truths
    stages = sorted(p.name for p in (tmp_path / "debug").glob(f"{readable[0].stem}_*.png"))
    assert stages == [f"{readable[0].stem}_{s}.png" for s in ("0_gray", "3_resize_pad", "4_clahe")]  # no crop: as trained


def test_only_file_names_that_are_labels_of_the_model_are_scored(trained_run, digits_folder, tmp_path, capsys):
    """The model reads digits, up to 4: IMG_1234.png and 12345.png are read but not scored against 'IMG' or '12345'."""
    folder = tmp_path / "named"
    folder.mkdir()
    image = preprocess.list_images(digits_folder)[0]
    for name in ["IMG_1234.png", "12345.png", f"{label_sources.label_from_filename(image)}.png"]:
        (folder / name).write_bytes(image.read_bytes())
    model_path = trained_run / runstate.BEST_NAME
    assert read_captchas.main(["--model", str(model_path), "--folder", str(folder)]) == 0
    out = capsys.readouterr().out
    text = expected_texts(model_path, [image])[0]
    exact = float(text == label_sources.label_from_filename(image))
    assert f"1 labelled image: exact match {exact:.4f} ({exact:.4f} ignoring case)" in out
    assert ("not scored, file name not a label of this model: 1 longer than the model's 4 characters "
            "(e.g. 12345.png), 1 symbols outside the model's charset (GIM_) (e.g. IMG_1234.png)") in out


def test_test_py_user_errors_are_one_line(trained_run, tmp_path):
    legacy = tmp_path / "legacy.keras"
    model.build_model(TINY, 63, legacy_lambda=True).save(legacy)
    image = tmp_path / "x.png"
    image.write_bytes(READER_IMAGES[0].read_bytes())  # a readable image: the model is what is wrong
    assert_one_line_error(run_script("test.py", "--model", tmp_path / "none.keras", "--image", image),
                          "none.keras", "does not exist")
    assert_one_line_error(run_script("test.py", "--model", legacy, "--image", image), "legacy.keras", "export_safe.py")
    assert_one_line_error(run_script("test.py", "--model", trained_run / runstate.BEST_NAME, "--folder", tmp_path / "no"),
                          "folder does not exist")
    assert_one_line_error(run_script("test.py", "--model", trained_run / runstate.BEST_NAME, "--image", image,
                                     "--charset", "default"), "crnn_ctc_best.keras", "reads '0123456789'")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    assert_one_line_error(run_script("test.py", "--model", junk, "--image", image), "junk.keras", "not a Keras")


# ----------------------------------------------------------------------------- export_safe.py


def legacy_checkpoint(path, collapse="mean", lambda_function=None, num_classes=63):
    """A reference-style checkpoint: Lambda height collapse, no metadata. Returns the in-memory model."""
    crnn = model.build_model(model.ModelConfig(**{**TINY.to_dict(), "collapse": collapse}), num_classes,
                             legacy_lambda=True)
    if lambda_function is not None:
        def swap_lambda(layer):
            if isinstance(layer, keras.layers.Lambda):
                return keras.layers.Lambda(lambda_function, name=layer.name)
            return layer.__class__.from_config(layer.get_config())

        weights = crnn.get_weights()
        crnn = keras.models.clone_model(crnn, clone_function=swap_lambda)
        crnn.set_weights(weights)
    crnn.save(path)
    return crnn


@pytest.mark.parametrize("collapse", ["mean", "flatten"])
def test_export_rebuilds_a_lambda_model_with_identical_outputs(tmp_path, collapse, capsys):
    src, dst = tmp_path / "final.keras", tmp_path / "final_safe.keras"
    original = legacy_checkpoint(src, collapse)
    assert export_safe.main(["--in_keras", str(src), "--out_keras", str(dst)]) == 0
    assert f"CollapseHeight(mode='{collapse}')" in capsys.readouterr().out
    assert modelmeta.lambda_layer_names(dst) == []
    safe = keras.saving.load_model(dst, safe_mode=True)  # Keras' own safe mode, no help from us
    assert any(isinstance(layer, model.CollapseHeight) for layer in safe.layers)
    batch = export_safe.parity_batch(safe, count=4, seed=9)
    assert np.max(np.abs(safe.predict_on_batch(batch) - original.predict_on_batch(batch))) < 1e-5


def test_exported_reference_checkpoint_decodes_with_the_blank_last(tmp_path, capsys):
    src, dst = tmp_path / "ref.keras", tmp_path / "ref_safe.keras"
    original = legacy_checkpoint(src)
    dense = original.get_layer("softmax")
    kernel, bias = dense.get_weights()
    bias[:] = -10.0
    bias[0] = 10.0  # every step says class 0: "A" when the blank is last, nothing if it were first
    dense.set_weights([np.zeros_like(kernel), bias])
    original.save(src)
    assert export_safe.main(["--in_keras", str(src), "--out_keras", str(dst), "--trust_input"]) == 0
    assert "parity with the original (trusted) model" in capsys.readouterr().out
    _, meta = model.load_model(dst)
    assert meta["charset"]["blank_index"] == 62
    image = tmp_path / "Q.png"
    image.write_bytes(synth.generate_synthetic(tmp_path / "img", 1, workers=1, progress=False)[0].read_bytes())
    assert read_captchas.main(["--model", str(dst), "--image", str(image)]) == 0
    assert f"{image} -> A" in capsys.readouterr().out


def test_export_never_runs_code_stored_in_the_input(tmp_path):
    marker = tmp_path / "code-ran"
    src = tmp_path / "planted.keras"
    legacy_checkpoint(src, lambda_function=lambda t, m=str(marker): (open(m, "w").close(),
                                                                   __import__("keras").ops.mean(t, axis=1))[1])
    marker.unlink(missing_ok=True)  # building the model in this process ran it once; the export must not
    result = run_script("export_safe.py", "--in_keras", src, "--out_keras", tmp_path / "out.keras")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert modelmeta.lambda_layer_names(tmp_path / "out.keras") == []


def test_export_user_errors(tmp_path, trained_run, capsys):
    src = tmp_path / "m.keras"
    legacy_checkpoint(src)
    assert_one_line_error(run_script("export_safe.py", "--in_keras", src, "--out_keras", src), "overwrite")
    other = tmp_path / "other.keras"
    legacy_checkpoint(other, num_classes=11)
    assert export_safe.main(["--in_keras", str(other), "--out_keras", str(tmp_path / "o.keras")]) == 2
    assert "11 output classes" in capsys.readouterr().err
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2), keras.layers.Dense(3)])
    dense.save(tmp_path / "dense.keras")  # a Lambda, but no CRNN around it
    assert export_safe.main(["--in_keras", str(tmp_path / "dense.keras"), "--out_keras", str(tmp_path / "d.keras")]) == 2
    assert "not a CRNN this tool can rebuild" in capsys.readouterr().err
    assert not (tmp_path / "d.keras").exists()
    safe_copy = tmp_path / "copy.keras"
    assert export_safe.main(["--in_keras", str(trained_run / runstate.BEST_NAME), "--out_keras", str(safe_copy)]) == 0
    assert "already loads in safe mode" in capsys.readouterr().out
    copied, meta = model.load_model(safe_copy)
    original, original_meta = model.load_model(trained_run / runstate.BEST_NAME)
    assert meta == original_meta and all(np.array_equal(a, b) for a, b in zip(copied.get_weights(), original.get_weights()))
    assert safe_copy.stat().st_size < (trained_run / runstate.BEST_NAME).stat().st_size  # without the optimizer state


# ----------------------------------------------------------------------------- synth.py


def test_synth_command_writes_a_labelled_folder(tmp_path):
    result = run_script("synth.py", "--out", tmp_path / "s", "--count", "6", "--seed", "3",
                        "--charset", "lower_digits", "--length", "4-6", "--workers", "1")
    assert result.returncode == 0, result.stderr
    labels = [label_sources.label_from_filename(p) for p in preprocess.list_images(tmp_path / "s")]
    assert len(labels) == 6 and all(4 <= len(label) <= 6 for label in labels)
    assert not Charset(preprocess.CHARSET_PRESETS["lower_digits"]).unknown_symbols("".join(labels))


@pytest.mark.parametrize("script", ["train", "test", "export_safe", "dataset", "synth", "plots", "serve", "tools.rawformats",
                                    "tools.bench", "tools.speed", "tools.fewlabels", "tools.eyeread", "tools.pretrain"])
def test_every_script_has_help(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_unsafe_flag_is_the_only_way_to_load_a_lambda_model(tmp_path, digits_folder, capsys):
    legacy = tmp_path / "legacy.keras"
    model.build_model(TINY, 63, legacy_lambda=True).save(legacy)
    image = preprocess.list_images(digits_folder)[0]
    assert read_captchas.main(["--model", str(legacy), "--image", str(image)]) == 2
    assert "export_safe.py" in capsys.readouterr().err
    assert read_captchas.main(["--model", str(legacy), "--image", str(image), "--unsafe"]) == 0
    assert capsys.readouterr().out.startswith(f"{image} -> ")


def test_onnx_and_savedmodel_exports_match_the_keras_model(tmp_path, capsys):
    onnx_path, saved_path = tmp_path / "m.onnx", tmp_path / "m_savedmodel"
    assert export_safe.main(["--in_keras", str(READER), "--out_keras", str(onnx_path), "--format", "onnx"]) == 0
    assert export_safe.main(["--in_keras", str(READER), "--out_keras", str(saved_path), "--format", "savedmodel"]) == 0
    printed = capsys.readouterr().out
    assert "m.onnx (onnx): max abs difference" in printed and "m_savedmodel (savedmodel)" in printed
    assert json.loads((saved_path / modelmeta.META_MEMBER).read_text())["charset"]["symbols"] == "0123456789"

    network, meta = reader.load(onnx_path)
    keras_model, _ = model.load_model(READER)
    batch = export_safe.parity_batch(keras_model, count=3, seed=5)
    assert np.max(np.abs(network.predict_on_batch(batch) - keras_model.predict_on_batch(batch))) < 1e-4
    folder = ["--folder", str(READER_IMAGES[0].parent)]
    assert read_captchas.main(["--model", str(onnx_path), *folder]) == 0
    from_onnx = capsys.readouterr().out
    assert f"{len(READER_IMAGES)} labelled images: exact match 1.0000" in from_onnx  # every text read right
    assert read_captchas.main(["--model", str(READER), *folder]) == 0
    assert capsys.readouterr().out == from_onnx  # same texts, same scores


def test_tflite_export_runs_on_the_builtin_interpreter(tmp_path, capsys):
    tflite_path = tmp_path / "m.tflite"
    assert export_safe.main(["--in_keras", str(READER), "--out_keras", str(tflite_path), "--format", "tflite"]) == 0
    assert "m.tflite (tflite): max abs difference" in capsys.readouterr().out
    network, meta = reader.load(tflite_path)  # the standard interpreter: no TensorFlow "select" ops needed
    keras_model, _ = model.load_model(READER)
    for count in (1, 5):  # the interpreter is resized to each batch size
        batch = export_safe.parity_batch(keras_model, count=count, seed=count)
        assert np.max(np.abs(network.predict_on_batch(batch) - keras_model.predict_on_batch(batch))) < 1e-4
    folder = ["--folder", str(READER_IMAGES[0].parent)]
    assert read_captchas.main(["--model", str(tflite_path), *folder]) == 0
    from_tflite = capsys.readouterr().out
    assert f"{len(READER_IMAGES)} labelled images: exact match 1.0000" in from_tflite
    assert [r.text for r in reader.Reader(tflite_path).read_paths(READER_IMAGES)] == reader_labels()
    assert read_captchas.main(["--model", str(READER), *folder]) == 0
    assert capsys.readouterr().out == from_tflite

    modelmeta.tflite_meta_path(tflite_path).unlink()
    assert read_captchas.main(["--model", str(tflite_path), *folder]) == 2
    assert "m.tflite.json is missing" in capsys.readouterr().err
