"""Faithful to the reference: its exact network, recipe and preprocessing, and its real checkpoints
(a Lambda calling a module-level `tf`, no metadata) convert, read, export and fine-tune."""

import json

import keras
import numpy as np
import pytest

import export_safe
import model
import modelmeta
import charsets
import errors
import imagefiles
import preprocess
import reader
import recipes
import runstate
import test as read_captchas
import train
from charsets import Charset
from reference_checkpoint import build_reference_crnn, save_reference_checkpoint


def layer_signature(crnn):
    """Layer kinds, in order, with their weights' shapes: what must agree for weights to carry over."""
    return [(type(layer).__name__.replace("ReLU", "Activation"), [tuple(w.shape) for w in layer.weights])
            for layer in crnn.layers if not isinstance(layer, (keras.layers.Lambda, model.CollapseHeight))]


def test_seed_preset_is_the_reference_network():
    seed = model.build_model(model.PRESETS["seed"], 63)
    assert seed.count_params() == 4_394_879
    assert layer_signature(seed) == layer_signature(build_reference_crnn())
    names = [layer.name for layer in seed.layers]
    assert names[-4:] == ["collapse_height", "bilstm_1", "bilstm_2", "softmax"]
    assert seed.output_shape == (None, 50, 63) and seed.get_layer("softmax").dtype_policy.compute_dtype == "float32"
    assert seed.get_layer("bilstm_1").forward_layer.dropout == 0.15
    assert [layer.rate for layer in seed.layers if isinstance(layer, keras.layers.Dropout)] == [0.25] * 3


def test_reference_recipe_is_the_references(digits_folder, tmp_path, capsys):
    recipe = recipes.RECIPES["reference"]
    assert (recipe.optimizer, recipe.learning_rate, recipe.batch_size, recipe.clipnorm) == ("adam", 1e-3, 128, 0.0)
    assert (recipe.augment, recipe.resize) == ("none", "reference")
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(digits_folder), "--preset", "tiny", "--recipe", "reference", "--epochs", "1",
                       "--charset", "digits", "--workers", "1", "--out", str(out)]) == 0
    assert "recipe reference: adam, halved on plateau from 0.001, batch 128" in capsys.readouterr().out
    _, meta = model.load_model(out / runstate.BEST_NAME)
    assert meta["preprocess"]["resize"] == "reference" and meta["preprocess"]["auto_crop"] is False
    # its best checkpoint on val_loss is the run's model, as the reference's; only a one-cycle run prefers its final
    assert "kept" not in meta and json.loads((out / "metrics.json").read_text())["kept"]["model"] == "best checkpoint"
    assert (meta["preprocess"]["clahe_clip"], meta["preprocess"]["clahe_tiles"]) == (2.0, [8, 8])


def test_reference_preprocessing_pads_with_the_resized_mean():
    gray = np.zeros((40, 100), np.uint8)
    gray[:, :10] = 200  # a bright strip: the border's median is 0, the image's mean is 20
    canvas = preprocess.resize_and_pad(gray, 50, 200, mode="reference")
    resized_width = int(100 * min(200 / 100, 50 / 40))  # 125: the reference truncates
    left = (200 - resized_width) // 2
    assert (canvas[:, : left - 1] == int(canvas[:, left:left + resized_width].mean())).all()
    assert (preprocess.resize_and_pad(gray, 50, 200)[:, :left - 1] == 0).all()  # the default pads with the border's


def test_newer_metadata_is_refused(tmp_path, trained_run):
    meta = modelmeta.read_meta(trained_run / runstate.BEST_NAME)
    crnn, _ = model.load_model(trained_run / runstate.BEST_NAME)
    model.save_model(crnn, tmp_path / "future.keras", {**meta, "format_version": modelmeta.META_VERSION + 1})
    with pytest.raises(errors.CaptchaError, match="newer than this release"):
        model.load_model(tmp_path / "future.keras")


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    """The reference-shaped checkpoint, its in-memory original, and its safe conversion by export_safe.py."""
    folder = tmp_path_factory.mktemp("reference")
    original = save_reference_checkpoint(folder / "crnn_ctc_final.keras")
    assert modelmeta.read_meta(folder / "crnn_ctc_final.keras") is None  # saved as the reference saves: no metadata
    safe = folder / "crnn_ctc_final_safe.keras"
    assert export_safe.main(["--in_keras", str(folder / "crnn_ctc_final.keras"), "--out_keras", str(safe)]) == 0
    return folder, original, safe


def test_reference_checkpoint_converts_with_identical_outputs(reference_files):
    _, original, safe = reference_files
    converted = keras.saving.load_model(safe, safe_mode=True)  # Keras' own safe mode
    assert modelmeta.lambda_layer_names(safe) == []
    batch = export_safe.parity_batch(converted, count=4, seed=3)
    assert np.max(np.abs(converted.predict_on_batch(batch) - original.predict_on_batch(batch))) < 1e-5


def test_converted_reference_checkpoint_reads_with_the_blank_last(reference_files, digits_folder, capsys):
    _, original, safe = reference_files
    _, meta = model.load_model(safe)
    assert meta["charset"] == {"symbols": charsets.DEFAULT_SYMBOLS, "blank_index": 62}
    assert meta["preprocess"]["resize"] == "reference" and meta["preprocess"]["auto_crop"] is False
    image = imagefiles.list_images(digits_folder)[0]
    pixels = preprocess.load_image(image, preprocess.REFERENCE_PREPROCESSING)[np.newaxis]
    expected = reader.decode(original.predict_on_batch(pixels), Charset(blank_index=62))[0]
    assert read_captchas.main(["--model", str(safe), "--image", str(image)]) == 0
    assert f"{image} -> {expected} (" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_converted_reference_checkpoint_exports(reference_files, fmt, digits_folder, capsys):
    folder, original, safe = reference_files
    exported = folder / f"reference.{fmt}"
    assert export_safe.main(["--in_keras", str(safe), "--out_keras", str(exported), "--format", fmt]) == 0
    network, meta = reader.load(exported)
    assert meta["charset"]["blank_index"] == 62
    batch = export_safe.parity_batch(original, count=2, seed=5)
    assert np.max(np.abs(network.predict_on_batch(batch) - original.predict_on_batch(batch))) < 1e-4


def test_fine_tuning_starts_from_a_converted_reference_checkpoint(reference_files, digits_folder, tmp_path, capsys):
    _, original, safe = reference_files
    out = tmp_path / "tuned"
    assert train.main(["--data_dir", str(digits_folder), "--init_from", str(safe), "--charset", "digits",
                       "--epochs", "1", "--batch_size", "8", "--workers", "1", "--out", str(out)]) == 0
    assert f"starting from {safe} (every symbol's output row carried over)" in capsys.readouterr().out
    tuned, meta = model.load_model(out / runstate.FINAL_NAME)
    # the reference's architecture, read from the file, with 10 digits + blank (first) as outputs
    assert layer_signature(tuned)[:-1] == layer_signature(original)[:-1]
    assert tuned.output_shape == (None, 50, 11) and meta["charset"] == {"symbols": "0123456789", "blank_index": 0}
    assert meta["preprocess"]["resize"] == "reference"
