"""Issue: scale — training under tf.distribute's MirroredStrategy."""

import json
import subprocess
import sys

import model
import runstate
import train
from conftest import ROOT

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


def test_speed_script_times_the_loader_and_inference(trained_run, digits_folder, capsys):
    import re

    from tools import speed

    assert speed.main(["loader", str(digits_folder), "--charset", "digits", "--batch_size", "8"]) == 0
    out = capsys.readouterr().out
    loaded = re.search(r"loader: (\d+) images in [\d.]+ s = (\d+) images/s .* peak memory (\d+) MB", out)
    assert loaded and int(loaded[1]) == 40 and int(loaded[2]) > 0 and int(loaded[3]) > 0, out
    assert speed.main(["loader", str(digits_folder), "--charset", "digits", "--batch_size", "8", "--augment",
                       "light"]) == 0  # the training loader, as train.py runs it
    assert re.search(r"loader: 40 images in .* augmentation light\)", capsys.readouterr().out)

    assert speed.main(["step", "--preset", "tiny", "--batch_size", "4", "--steps", "2", "--warmup", "1"]) == 0
    stepped = re.search(r"training step: preset tiny, 62 symbols \(output layer [\d,]+ of [\d,]+ weights\), batch 4, "
                        r"float32: [\d.]+ ms a step = (\d+) images/s .* peak memory (\d+) MB", capsys.readouterr().out)
    assert stepped and int(stepped[1]) > 0 and int(stepped[2]) > 0
    assert speed.main(["step", "--preset", "tiny", "--symbols", "1000", "--batch_size", "4", "--steps", "1",
                       "--warmup", "1"]) == 0  # a large alphabet's output layer
    assert "preset tiny, 1000 symbols" in capsys.readouterr().out
    assert speed.main(["ratio", str(digits_folder), "--preset", "tiny", "--batch_size", "8", "--steps", "3"]) == 0
    row = re.search(r"\| \S+ \| tiny \| default \| 2 threads \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|",
                    capsys.readouterr().out)
    assert row and all(int(row[k]) > 0 for k in (1, 2, 3)) and float(row[4]) > 0

    best = trained_run / runstate.BEST_NAME
    assert speed.main(["inference", str(best), "--folder", str(digits_folder), "--batch_size", "16",
                       "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"folder of 40 images at batch 16: \d+ images/s", out), out
    assert re.search(r"one image \(read, preprocess, predict, decode\): median [\d.]+ ms over 3", out), out
