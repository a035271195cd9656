"""finetune.py: the model a run starts from (the shipped base model, or a .keras file), its output rows carried
over by symbol, and frozen convolutions."""

import keras
import numpy as np
import pytest

import finetune
import label_sources
import metrics
import model
import charsets
import imagefiles
import preprocess
import reader
import runstate
import synth
import train
from conftest import DIGITS, stop_after_epoch
from charsets import Charset
from errors import CaptchaError
from preprocess import PreprocessOptions


def output_rows(crnn):
    kernel, bias = crnn.get_layer("softmax").get_weights()
    return kernel, bias


@pytest.mark.parametrize("source_blank", ["first", "last"])
def test_fine_tuning_carries_output_rows_over_by_symbol(source_blank):
    """Same size, other symbols: 'dcbx' keeps what 'abcd' learned for d, c, b and the blank; x starts fresh."""
    config = model.PRESETS["tiny"]
    source_charset = charsets.charset_from_arg("abcd", source_blank)
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


def test_the_base_model_is_shipped_small_and_safe():
    assert finetune.BASE_MODEL.exists() and finetune.BASE_MODEL.stat().st_size <= 10 * 2**20
    base, meta = model.load_model(finetune.BASE_MODEL)  # safe mode: nothing in the file runs
    assert meta["charset"]["symbols"] == charsets.DEFAULT_SYMBOLS and meta["max_len"] == 8
    assert model.ModelConfig.from_dict(meta["model_config"]) == model.PRESETS[finetune.BASE_PRESET]
    assert base.count_params() == model.build_model(model.PRESETS[finetune.BASE_PRESET], 63).count_params()


def test_the_base_model_reads_captchas_it_never_saw(tmp_path):
    """Zero-shot, on captchas drawn with a seed the pre-training data did not use: it has learned the symbols."""
    folder = tmp_path / "unseen"
    synth.generate_synthetic(folder, 24, synth.Drawing(style="gregwar", length=5), seed=90210, workers=1, progress=False)
    base, meta = model.load_model(finetune.BASE_MODEL)
    paths = imagefiles.list_images(folder)
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


def cnn_weights(crnn):
    return [w.numpy() for layer in crnn.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization))
            for w in layer.weights]


def test_frozen_convolutions_stay_fixed_through_a_resume_then_learn(trained_run, digits_folder, tmp_path,
                                                                    monkeypatch, capsys):
    """--freeze_cnn_epochs 2 --epochs 3, stopped after epochs 1 and 2 and resumed each time: the convolutions
    (BatchNorm statistics included) keep the source's weights for two epochs, the optimizer state
    survives the resume inside the frozen phase, and the convolutions learn in epoch 3."""
    source = trained_run / runstate.BEST_NAME
    out = tmp_path / "tuned"
    stop_after_epoch(monkeypatch, 1)
    code = train.main(["--data_dir", str(digits_folder), "--init_from", str(source), "--freeze_cnn_epochs", "2",
                       "--epochs", "3", "--batch_size", "8", "--workers", "1", "--charset", "digits",
                       "--out", str(out)])
    assert code == 130
    printed = capsys.readouterr().out
    assert f"starting from {source} (every symbol's output row carried over)" in printed and "convolutions frozen" in printed
    steps_per_epoch = 4  # 32 training images, batch 8
    before, _ = model.load_model(source)
    after_1, _ = model.load_model(out / runstate.RESUME_NAME, compile=True)
    assert int(after_1.optimizer.iterations.numpy()) == steps_per_epoch

    stop_after_epoch(monkeypatch, 2)
    assert train.main(["--resume", "--out", str(out)]) == 130
    after_2, _ = model.load_model(out / runstate.RESUME_NAME, compile=True)
    assert int(after_2.optimizer.iterations.numpy()) == 2 * steps_per_epoch  # went on counting: state kept
    assert all(np.array_equal(x, y) for x, y in zip(cnn_weights(before), cnn_weights(after_2)))  # frozen
    lstm = lambda m: m.get_layer("bilstm_1").get_weights()[0]  # noqa: E731
    assert not np.array_equal(lstm(after_1), lstm(after_2))  # while the rest learned

    monkeypatch.undo()
    assert train.main(["--resume", "--out", str(out)]) == 0
    final, _ = model.load_model(out / runstate.FINAL_NAME)
    assert not all(np.array_equal(x, y) for x, y in zip(cnn_weights(before), cnn_weights(final)))  # thawed


def test_fine_tuning_to_another_charset_keeps_the_shared_symbols(trained_run, tmp_path, capsys):
    data = tmp_path / "hex"
    synth.generate_synthetic(data, 30, synth.Drawing(symbols="0123456789abcdef", length=4), seed=4, workers=1, progress=False)
    out = tmp_path / "tuned"
    assert train.main(["--data_dir", str(data), "--init_from", str(trained_run / runstate.BEST_NAME), "--epochs", "1",
                       "--charset", "0123456789abcdef", "--batch_size", "8", "--workers", "1",
                       "--out", str(out)]) == 0
    assert "output rows for new symbols start untrained: abcdef" in capsys.readouterr().out
    tuned, meta = model.load_model(out / runstate.FINAL_NAME)
    assert tuned.output_shape == (None, 50, 17) and meta["charset"]["symbols"] == "0123456789abcdef"
