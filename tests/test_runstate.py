"""runstate.py with train.py --resume: an interrupted run loses nothing and continues as the same run."""

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import callbacks
import label_sources
import model
import modelmeta
import imagefiles
import runstate
import runscore
import synth
import train
from conftest import DIGITS, ROOT

EPOCHS = 5


def backend_env(backend):
    return {**os.environ, "KERAS_BACKEND": backend}


def start_training(data, out, backend="tensorflow", extra=()):
    """train.py that waits inside a training step of epoch 2 (tests/paused_train.py) until it is interrupted;
    in a session of its own, so a test can signal its whole process group as a terminal's Ctrl-C does."""
    return subprocess.Popen(
        [sys.executable, "tests/paused_train.py", str(out / "paused"), "--data_dir", str(data), "--preset", "tiny",
         "--epochs", str(EPOCHS), "--batch_size", "8", "--workers", "1", "--charset", "digits", "--out", str(out),
         *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=backend_env(backend),
        start_new_session=True)


def wait_until_paused_in_epoch_two(process, out):
    """Returns once training has finished epoch 1 and stands still in epoch 2, however long that takes."""
    while not (out / "paused").exists():
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    assert (out / runstate.RESUME_NAME).exists()


def resume_and_check(out, backend="tensorflow"):
    result = subprocess.run([sys.executable, "train.py", "--resume", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900, env=backend_env(backend))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming the run" in result.stdout
    with open(out / runstate.LOG_NAME) as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == list(range(EPOCHS))  # every epoch once, in order, none lost or repeated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == EPOCHS
    model.load_model(out / runstate.BEST_NAME)
    assert not (out / runstate.RESUME_NAME).exists()  # finished: nothing left to resume


def test_resume_after_sigkill_mid_epoch(resume_data, tmp_path):
    out = tmp_path / "run"
    process = start_training(resume_data, out)
    wait_until_paused_in_epoch_two(process, out)
    process.kill()
    process.wait()
    state = modelmeta.read_meta(out / runstate.RESUME_NAME)["resume"]
    assert state["epochs_done"] == 1  # stopped in epoch 2
    model.load_model(out / runstate.BEST_NAME)  # the best checkpoint survived the kill
    resume_and_check(out)


@pytest.mark.parametrize("stop, backend, processes", [
    (signal.SIGINT, "tensorflow", 0),
    (signal.SIGTERM, "tensorflow", 0),
    # under JAX a step holds the weights' buffers while it runs: a stop inside one used to leave nothing to save
    pytest.param(signal.SIGINT, "jax", 0, marks=pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                                                   reason="jax is not installed")),
    # batches made in worker processes: Ctrl-C reaches them too (the whole process group), and they wait for
    # the training process to stop and close them
    (signal.SIGINT, "tensorflow", 2),
], ids=["ctrl_c", "sigterm", "ctrl_c_jax", "ctrl_c_processes"])
def test_ctrl_c_or_sigterm_inside_a_step_saves_a_resumable_checkpoint_and_exits_cleanly(resume_data, tmp_path, stop,
                                                                                       backend, processes):
    out = tmp_path / "run"
    process = start_training(resume_data, out, backend, ["--processes", str(processes)] if processes else [])
    wait_until_paused_in_epoch_two(process, out)
    os.killpg(process.pid, stop)  # as a terminal's Ctrl-C: every process of the group
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 128 + stop, output
    assert "Traceback" not in output and "Exception ignored" not in output, output  # nor in a library's callback
    assert "interrupted after 1 complete epochs" in output and "Continue with: python train.py --resume" in output
    crnn, meta = model.load_model(out / runstate.RESUME_NAME, compile=True)
    steps_per_epoch = math.ceil(meta["run"]["split_sizes"][0] / 8)
    # the optimizer state came along, with the update of the step the signal landed in (epoch 2, step 2)
    assert int(crnn.optimizer.iterations.numpy()) == steps_per_epoch + 2
    assert meta["resume"]["config"]["epochs"] == EPOCHS and meta["resume"]["epochs_done"] == 1
    if processes:
        assert "leaked" not in output  # the shared memory of the canvases was released
    resume_and_check(out, backend)


def write_log_rows(logger, epochs):
    """What fit() does to a run's CSVLogger over `epochs` (none: stopped before the first epoch ended)."""
    logger.on_train_begin()
    for epoch in epochs:
        logger.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1), "val_cer": 0.1 * epoch, "val_exact_match": 0.5})
    logger.on_train_end()


@pytest.mark.parametrize("epochs_done", [0, 2])
def test_a_resumed_run_logs_under_one_header_every_epoch_once(tmp_path, epochs_done):
    # A run stopped before its first epoch ended leaves an empty log: resumed, its log must still get a
    # header (without one, a five-epoch pre-training ended in a traceback when its log was plotted).
    log = tmp_path / runstate.LOG_NAME
    # the first run logs its completed epochs and the one it stopped in (which runs again), or none
    first_run = range(epochs_done + 1) if epochs_done else range(0)
    write_log_rows(keras.callbacks.CSVLogger(str(log)), first_run)
    runstate.keep_log_rows_before(log, epochs_done)  # what train.py does before it resumes
    write_log_rows(keras.callbacks.CSVLogger(str(log), append=True), range(epochs_done, 4))
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    assert runstate.validation_history(log) == [(0.1 * epoch, 0.5) for epoch in range(4)]


def test_resume_without_an_interrupted_run_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--resume", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no interrupted run to resume" in result.stderr


def test_resume_refuses_a_folder_that_changed(digits_folder, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for path in imagefiles.list_images(digits_folder):
        (data / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "run"
    args = ["--data_dir", str(data), "--preset", "tiny", "--epochs", "2", "--batch_size", "8", "--workers", "1",
            "--charset", "digits", "--out", str(out)]

    def stop_after_first_epoch(self, epoch, logs=None):
        self.epochs_done = epoch + 1
        self.save()
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.ResumeCheckpoint, "on_epoch_end", stop_after_first_epoch)
        assert train.main(args) == 130
    extra = synth.generate_synthetic(tmp_path / "more", 6, synth.Drawing(symbols=DIGITS, length=4), seed=99, workers=1, progress=False)
    added = [data / f"{label_sources.label_from_filename(path)}_9.png" for path in extra]
    for path, copy in zip(extra, added):  # the folder grows: the same seed now splits it differently
        copy.write_bytes(path.read_bytes())
    capsys.readouterr()
    assert train.main(["--resume", "--out", str(out)]) == 2
    assert "the folder changed since the run started" in capsys.readouterr().err
    for copy in added:
        copy.unlink()
    assert train.main(["--resume", "--out", str(out)]) == 0  # the same folder again: it resumes
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2


def test_a_stop_while_scoring_leaves_a_run_that_finishes_with_resume(digits_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        patch.setattr(runscore, "score_run", interrupted)
        assert train.main(["--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "2", "--batch_size", "8",
                           "--workers", "1", "--charset", "digits", "--out", str(out)]) == 130
    printed = capsys.readouterr().out
    assert "interrupted while scoring" in printed and "Traceback" not in printed
    assert not (out / "metrics.json").exists() and (out / runstate.FINAL_NAME).exists()
    assert modelmeta.read_meta(out / runstate.RESUME_NAME)["resume"]["finished"] is True
    assert train.main(["--resume", "--out", str(out)]) == 0  # no more training: only the scoring
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["test"]["count"] > 0
    with open(out / runstate.LOG_NAME) as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1]
    assert not (out / runstate.RESUME_NAME).exists()


ONE_THREAD_TRAIN = """
import sys
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import callbacks, train
if sys.argv[1] == "stop":  # stop after the first epoch, as Ctrl-C between epochs would
    def stop_after_first_epoch(self, epoch, logs=None):
        self.epochs_done = epoch + 1
        self.save()
        raise KeyboardInterrupt
    callbacks.ResumeCheckpoint.on_epoch_end = stop_after_first_epoch
sys.exit(train.main(sys.argv[2:]))
"""


def test_an_interrupted_and_resumed_run_ends_with_the_weights_of_an_unbroken_one(resume_data, tmp_path):
    """The same batches in the same order and augmentation after a resume, and the same optimizer state: one
    thread, the same backend, the same final weights."""
    def run(mode, *args):
        result = subprocess.run([sys.executable, "-c", ONE_THREAD_TRAIN, mode, *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=900)
        return result.returncode, result.stdout + result.stderr

    common = ["--data_dir", str(resume_data), "--preset", "tiny", "--epochs", "3", "--batch_size", "8",
              "--charset", "digits", "--workers", "1", "--augment", "light", "--clean_finish", "0"]
    code, output = run("go", *common, "--out", str(tmp_path / "unbroken"))
    assert code == 0, output
    code, output = run("stop", *common, "--out", str(tmp_path / "resumed"))
    assert code == 130, output
    code, output = run("go", "--resume", "--out", str(tmp_path / "resumed"))
    assert code == 0 and "resuming the run" in output, output
    unbroken, _ = model.load_model(tmp_path / "unbroken" / runstate.FINAL_NAME)
    resumed, _ = model.load_model(tmp_path / "resumed" / runstate.FINAL_NAME)
    for a, b in zip(unbroken.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
