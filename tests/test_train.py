"""train.py end to end: what a run writes, the built-in data, a large alphabet, other kinds of captcha, strategies,
one-line errors."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np

import export_safe
import label_sources
import model
import modelmeta
import imagefiles
import reader
import runstate
import synth
import train
from conftest import (
    ROOT,
    assert_one_line_error,
    cjk_font_needed,
    run_script,
)

# A fresh interpreter: TensorFlow's logical devices can only be set before it starts.
TWO_CPU_REPLICAS = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_mirrored_strategy_trains_on_two_replicas(tmp_path, digits_folder):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", TWO_CPU_REPLICAS, "--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "2",
         "--batch_size", "8", "--charset", "digits", "--workers", "1", "--strategy", "mirrored", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy: MirroredStrategy, 2 replicas; global batch 8 = 4 per replica" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    best, meta = model.load_model(out / runstate.BEST_NAME)
    assert best.output_shape[-1] == 11 and meta["charset"]["symbols"] == "0123456789"


def test_unknown_strategy_is_a_one_line_error(digits_folder, tmp_path, capsys):
    code = train.main(["--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "1", "--charset", "digits",
                       "--workers", "1", "--strategy", "horovod", "--out", str(tmp_path)])
    assert code == 2
    assert "unknown --strategy 'horovod'" in capsys.readouterr().err


def test_another_kind_of_captcha_trains_with_the_defaults(tmp_path):
    """Lower-case letters and digits, 4 to 6 characters, 150x40 JPEGs: charset and length come from the data."""
    data = tmp_path / "other"
    synth.generate_synthetic(data, 40, synth.Drawing(style="gregwar", symbols="abcdefghijklmnopqrstuvwxyz0123456789", length=(4, 6)), seed=9, workers=1, progress=False)
    labels = [label_sources.label_from_filename(p) for p in imagefiles.list_images(data)]
    out = tmp_path / "out"
    assert train.main(["--data_dir", str(data), "--preset", "tiny", "--epochs", "1", "--workers", "1",
                       "--out", str(out)]) == 0
    _, meta = model.load_model(out / runstate.BEST_NAME)
    assert meta["max_len"] == max(map(len, labels)) == 6
    assert set(meta["charset"]["symbols"]) == set("".join(labels)) and meta["charset"]["blank_index"] == 0


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


def test_built_in_data_is_drawn_once_and_cached(tmp_path, capsys):
    args = ["--synth_dir", str(tmp_path / "synth"), "--preset", "tiny", "--epochs", "1", "--workers", "1",
            "--out", str(tmp_path / "out")]
    assert train.main(args + ["--synth_count", "30"]) == 0
    drawn = {p: p.stat().st_mtime_ns for p in imagefiles.list_images(tmp_path / "synth" / "captcha")}
    assert len(drawn) == 30 and "drawing 30 synthetic captchas" in capsys.readouterr().out
    assert train.main(args + ["--synth_count", "20"]) == 0
    printed = capsys.readouterr().out
    assert "drawing" not in printed and "split 16 train / 2 val / 2 test" in printed  # a subset of the cache
    assert {p: p.stat().st_mtime_ns for p in imagefiles.list_images(tmp_path / "synth" / "captcha")} == drawn


def test_training_on_an_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    assert_one_line_error(run_script("train.py", "--data_dir", tmp_path, "--out", tmp_path / "out"),
                          str(tmp_path), "no usable labelled images")


@cjk_font_needed
def test_a_thousand_symbol_charset_trains_from_spaced_labels_exports_to_onnx_and_reads_alike(tmp_path, capsys):
    symbols = synth.cjk_symbols(1000)
    drawn = synth.generate_synthetic(tmp_path / "drawn", 24, synth.Drawing(style="cjk", symbols=symbols, length=4), seed=9, workers=1, progress=False)
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, path in enumerate(drawn):  # numbered images, labels as CnOCR writes them: 624.jpg<TAB>降 飞 淀 惶
        shutil.copy(path, folder / f"{i}.png")
        rows.append(f"{i}.png\t{' '.join(path.stem)}\n")
    (tmp_path / "labels.tsv").write_text("".join(rows), encoding="utf-8")
    (tmp_path / "dict.txt").write_text("\n".join(symbols) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(folder), "--labels", str(tmp_path / "labels.tsv"), "--charset",
                       str(tmp_path / "dict.txt"), "--preset", "tiny", "--init_from", "none", "--epochs", "1",
                       "--batch_size", "8", "--workers", "1", "--out", str(out)]) == 0
    assert "spaces: one space between symbols in 24 of 24 labels" in capsys.readouterr().out
    meta = modelmeta.read_meta(out / "crnn_ctc_best.keras")
    assert meta["charset"]["symbols"] == symbols and meta["max_len"] == 4 and meta["labels"]["spaces"] == "join"
    onnx = tmp_path / "model.onnx"
    assert export_safe.main(["--in_keras", str(out / "crnn_ctc_best.keras"), "--out_keras", str(onnx),
                             "--format", "onnx"]) == 0
    paths = sorted(folder.glob("*.png"))
    from_keras = reader.Reader(out / "crnn_ctc_best.keras")
    from_onnx = reader.Reader(onnx)
    images = np.stack([from_keras.prepare(p)[0] for p in paths])
    keras_probs = from_keras.network.predict_on_batch(images)
    assert keras_probs.shape[-1] == 1001  # 1,000 symbols and the blank
    np.testing.assert_allclose(from_onnx.network.predict_on_batch(images), keras_probs, atol=1e-4)
    assert [r.text for r in from_onnx.read_paths(paths)] == [r.text for r in from_keras.read_paths(paths)]
