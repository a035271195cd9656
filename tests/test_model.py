"""model.py and modelmeta.py: the network, CTC loss and decoding with the blank where the model puts it, saving and
loading with metadata, and archives that would run code or escape."""

import zipfile

import keras
import numpy as np
import pytest

import model
import modelmeta
import errors
from conftest import TINY, one_hot_probs
from charsets import Charset
from errors import CaptchaError
from preprocess import Canvas, PreprocessOptions


def test_archive_members_that_escape_are_refused(tmp_path):
    good = tmp_path / "good.keras"
    model.build_model(model.PRESETS["tiny"], 63).save(good)
    for name in ["../escaped.txt", "/abs.txt", "a/../../escaped.txt"]:
        bad = tmp_path / "bad.keras"
        bad.write_bytes(good.read_bytes())
        with zipfile.ZipFile(bad, "a") as archive:
            archive.writestr(name, "x")
        with pytest.raises(errors.CaptchaError, match="points outside the archive"):
            model.load_model(bad)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_time_steps_are_checked_against_label_length():
    with pytest.raises(errors.CaptchaError, match="time steps"):
        model.check_time_steps(model.time_steps(model.ModelConfig(), Canvas(width=16)), 5)


def test_collapse_height_modes_and_serialization():
    x = np.random.default_rng(0).random((2, 6, 50, 16)).astype("float32")
    mean = model.CollapseHeight("mean")
    flatten = model.CollapseHeight("flatten")
    assert np.allclose(keras.ops.convert_to_numpy(mean(x)), x.mean(axis=1), atol=1e-6)
    folded = keras.ops.convert_to_numpy(flatten(x))
    assert folded.shape == (2, 50, 96) and np.allclose(folded[1, 7], x[1, :, 7, :].reshape(-1))
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(flatten), safe_mode=True)
    assert isinstance(clone, model.CollapseHeight) and clone.mode == "flatten"
    with pytest.raises(ValueError):
        model.CollapseHeight("max")


@pytest.mark.parametrize("preset", sorted(model.PRESETS))
def test_presets_build_with_one_softmax_row_per_time_step(preset):
    config = model.PRESETS[preset]
    crnn = model.build_model(config, 63)
    assert crnn.input_shape == (None, 50, 200, 1)
    assert crnn.output_shape == (None, model.time_steps(config), 63)
    assert model.time_steps(config) == {"seed": 50, "fast": 50, "kerasio": 50, "small": 50, "tiny": 50}[preset]
    assert any(isinstance(layer, model.CollapseHeight) for layer in crnn.layers)
    if preset == "seed":  # the reference design
        convs = [layer.filters for layer in crnn.layers if isinstance(layer, keras.layers.Conv2D)]
        lstms = [layer.forward_layer.units for layer in crnn.layers if isinstance(layer, keras.layers.Bidirectional)]
        assert convs == [64, 64, 128, 128, 256, 256, 256] and lstms == [256, 256]


def test_kerasio_preset_is_the_keras_io_examples_network():
    crnn = model.build_model(model.PRESETS["kerasio"], 63)
    convs = [layer for layer in crnn.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64]
    assert all(isinstance(c.kernel_initializer, keras.initializers.HeNormal) for c in convs)  # as keras-io has them
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in crnn.layers)
    assert crnn.count_params() == 438_143  # 62 symbols


def test_legacy_variant_uses_a_lambda():
    crnn = model.build_model(TINY, 63, legacy_lambda=True)
    assert any(isinstance(layer, keras.layers.Lambda) for layer in crnn.layers)


def test_ctc_loss_prefers_the_right_text_and_honours_the_blank():
    for blank in (0, 62):
        charset = Charset(blank_index=blank)
        labels = np.array([charset.encode("ab") + [-1]], dtype=np.int32)  # padded to max_len 3
        a, b = charset.encode("ab")
        right = one_hot_probs([blank, a, blank, b, blank], confidence=0.9)
        wrong = one_hot_probs([blank, b, blank, a, blank], confidence=0.9)
        loss = model.CTCLoss(blank)
        right_loss = float(keras.ops.convert_to_numpy(loss(labels, right)))
        wrong_loss = float(keras.ops.convert_to_numpy(loss(labels, wrong)))
        assert 0 < right_loss < 1.0 < wrong_loss


def test_save_and_load_keep_metadata_and_outputs(tmp_path):
    charset = Charset("0123456789")
    crnn = model.build_model(TINY, charset.num_classes)
    meta = modelmeta.make_meta(charset, 4, PreprocessOptions(strong=True), TINY)
    path = tmp_path / "m.keras"
    model.save_model(crnn, path, meta)
    loaded, loaded_meta = model.load_model(path)
    assert {k: v for k, v in loaded_meta.items() if k != "model_config"} == {k: v for k, v in meta.items()
                                                                             if k != "model_config"}
    assert model.ModelConfig.from_dict(loaded_meta["model_config"]) == TINY
    x = np.random.default_rng(1).random((2, 50, 200, 1), dtype=np.float32)
    assert np.allclose(loaded.predict_on_batch(x), crnn.predict_on_batch(x), atol=1e-6)
    assert not list(tmp_path.glob(".m-*"))  # no temporary file left behind


def test_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    crnn = model.build_model(TINY, 63)
    path = tmp_path / "best.keras"
    model.save_model(crnn, path, modelmeta.make_meta(Charset(), 5, PreprocessOptions(), TINY))
    before = path.read_bytes()

    def crash(self, filepath, *args, **kwargs):
        open(filepath, "wb").write(b"half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_model(crnn, path, {})
    assert path.read_bytes() == before and not list(tmp_path.glob(".best-*"))


def test_load_refuses_lambda_models_in_safe_mode_and_names_the_fix(tmp_path):
    path = tmp_path / "legacy.keras"
    model.build_model(TINY, 63, legacy_lambda=True).save(path)
    with pytest.raises(CaptchaError, match="export_safe.py"):
        model.load_model(path)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CaptchaError, match="does not exist"):
        model.load_model(tmp_path / "missing.keras")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a zip")
    with pytest.raises(CaptchaError, match="junk.keras: not a Keras"):
        model.load_model(junk)


def test_checkpoint_without_metadata_is_read_as_the_reference(tmp_path):
    path = tmp_path / "plain.keras"
    model.build_model(TINY, 63).save(path)
    assert modelmeta.read_meta(path) is None
    _, meta = model.load_model(path)
    assert meta["charset"] == {"symbols": Charset().symbols, "blank_index": 62}
    other = tmp_path / "other.keras"
    model.build_model(TINY, 11).save(other)
    with pytest.raises(CaptchaError, match="11 output classes"):
        model.load_model(other)
    with zipfile.ZipFile(path) as archive:
        assert modelmeta.META_MEMBER not in archive.namelist()
