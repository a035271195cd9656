"""Shared fixtures: tiny seeded data, one tiny trained run, and the committed reader that reads its images.

The tiny run (trained_run) checks what training writes; it is too short to read anything. Checks that
compare texts across formats, the server and test.py use READER instead: a small model committed with
the images it reads exactly (tests/fixtures/make_reader.py rebuilds both)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import synth  # noqa: E402

DIGITS = "0123456789"
READER = ROOT / "tests" / "fixtures" / "reader.keras"
READER_IMAGES = sorted((ROOT / "tests" / "fixtures" / "images").glob("*.png"))  # each named by its text


def as_unlabelled(drawn, unlabelled):
    """The images of `drawn` (named by their text) copied into `unlabelled` as 0000.png, 0001.png, ...: no label in
    the names. Returns their truth {new name: text}, kept aside to check pseudo-labels."""
    import shutil

    unlabelled.mkdir(parents=True)
    truth = {}
    for i, path in enumerate(sorted(Path(drawn).iterdir())):
        shutil.copy(path, unlabelled / f"{i:04d}.png")
        truth[f"{i:04d}.png"] = path.stem
    return truth


def stop_after_epoch(monkeypatch, epoch):
    """Ctrl-C as epoch `epoch` (counted from 1) ends, right after its resume checkpoint is written."""
    import callbacks

    save = callbacks.ResumeCheckpoint.on_epoch_end

    def on_epoch_end(self, index, logs=None):
        save(self, index, logs)
        if index + 1 == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.ResumeCheckpoint, "on_epoch_end", on_epoch_end)


def run_stopped_while_round_one_is_scored(monkeypatch, flags):
    """train.py's self-training run with `flags`, stopped (Ctrl-C) as its round 1 is scored; returns the --out
    folders score_run was called with."""
    import scoring
    import train

    score_run, calls = scoring.score_run, []

    def interrupted_in_round_one(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score_run(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(scoring, "score_run", interrupted_in_round_one)
        assert train.main(flags) == 130
    return calls


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """40 captcha-package images, digits, labels of 3 or 4 characters (so lengths vary)."""
    folder = tmp_path_factory.mktemp("digits")
    synth.generate_synthetic(folder, 40, seed=7, symbols=DIGITS, length=(3, 4), workers=1, progress=False)
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_folder):
    """train.py end to end: tiny preset, 3 epochs. Returns its --out folder."""
    import train

    out = tmp_path_factory.mktemp("run")
    code = train.main(["--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "3", "--batch_size", "8",
                       "--charset", "digits", "--learning_rate", "0.01", "--workers", "1", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory):
    """The committed reader exported to ONNX (export_safe.py --format onnx)."""
    import export_safe

    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export_safe.main(["--in_keras", str(READER), "--out_keras", str(path), "--format", "onnx"]) == 0
    return path


def reader_labels():
    return [path.stem for path in READER_IMAGES]
