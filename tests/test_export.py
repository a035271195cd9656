"""export_safe.py: a Lambda checkpoint rebuilt with CollapseHeight, and the ONNX, int8 ONNX, SavedModel and TFLite
exports read alike."""

import json

import keras
import numpy as np
import pytest

import export_safe
import model
import modelmeta
import imagefiles
import reader
import runstate
import synth
import test as read_captchas  # the project's test.py (reads captchas), not a test module
from conftest import READER, READER_IMAGES, ROOT, TINY, assert_one_line_error, reader_labels, run_script


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


def test_unsafe_flag_is_the_only_way_to_load_a_lambda_model(tmp_path, digits_folder, capsys):
    legacy = tmp_path / "legacy.keras"
    model.build_model(TINY, 63, legacy_lambda=True).save(legacy)
    image = imagefiles.list_images(digits_folder)[0]
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
