"""Shared fixtures: tiny seeded data, one tiny trained run, and the committed reader that reads its images.

The tiny run (trained_run) checks what training writes; it is too short to read anything. Checks that
compare texts across formats, the server and test.py use READER instead: a small model committed with
the images it reads exactly (tests/fixtures/make_reader.py rebuilds both)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))  # make_reader: the committed reader's look, and its rebuild
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import dataset  # noqa: E402
import export_safe  # noqa: E402
import model  # noqa: E402
import reader  # noqa: E402
import synth  # noqa: E402
from make_reader import draw_folder  # noqa: E402  (the committed reader's look)
from charsets import Charset  # noqa: E402

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
    import runscore
    import train

    score_run, calls = runscore.score_run, []

    def interrupted_in_round_one(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score_run(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runscore, "score_run", interrupted_in_round_one)
        assert train.main(flags) == 130
    return calls


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """40 captcha-package images, digits, labels of 3 or 4 characters (so lengths vary)."""
    folder = tmp_path_factory.mktemp("digits")
    synth.generate_synthetic(folder, 40, synth.Drawing(symbols=DIGITS, length=(3, 4)), seed=7, workers=1, progress=False)
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


@pytest.fixture(scope="session")
def base_onnx(tmp_path_factory):
    """The shipped base model (pretrained/base.keras) exported to ONNX: a second, different network."""
    import export_safe

    path = tmp_path_factory.mktemp("base_onnx") / "base.onnx"
    assert export_safe.main(["--in_keras", str(ROOT / "pretrained" / "base.keras"), "--out_keras", str(path),
                             "--format", "onnx"]) == 0
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "twin: the test writes ONNX twins (twin.py), which the others skip")
    # Keras calls np.array(x) on its own tensors under NumPy 2; only that third-party warning is silenced, so that
    # any other shows
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword"
                                              ":DeprecationWarning")


@pytest.fixture(autouse=True)
def no_onnx_twin(request, monkeypatch):
    """A run's ONNX twin (twin.py) takes seconds to convert; only the tests marked `twin` write it."""
    if "twin" not in request.keywords:
        import twin

        monkeypatch.setattr(twin, "write_twin", lambda keras_path: None)


def reader_labels():
    return [path.stem for path in READER_IMAGES]


# ---- shared by several test modules


@pytest.fixture(scope="module")
def samples(digits_folder):
    return dataset.scan_folder(digits_folder, Charset(DIGITS), 4).samples[:8]


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume_data")
    synth.generate_synthetic(folder, 160, synth.Drawing(symbols=DIGITS, length=4), seed=2, workers=1, progress=False)
    return folder


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


@pytest.fixture(scope="module")
def thresholded_reader(tmp_path_factory):
    """The committed reader with a stored threshold between its images' confidences, as .keras and .onnx."""
    folder = tmp_path_factory.mktemp("thresholded")
    path = folder / "reader.keras"
    shutil.copy(READER, path)
    confidences = sorted(reading.confidence for reading in reader.Reader(READER).read_paths(READER_IMAGES))
    threshold = (confidences[3] + confidences[4]) / 2  # four readings below it, four above
    model.update_meta(path, {"abstain": {"target_precision": 0.99, "threshold": threshold, "val_precision": 1.0,
                                         "val_coverage": 0.5, "val_count": 8}})
    onnx_path = folder / "reader.onnx"
    assert export_safe.main(["--in_keras", str(path), "--out_keras", str(onnx_path), "--format", "onnx"]) == 0
    return path, folder / "reader.onnx", threshold


@pytest.fixture(scope="module")
def four_symbol_reader(tmp_path_factory):
    """The committed reader told that people typed it labels of 4 symbols only, as .keras and .onnx: of the
    fixture images it reads right, those of 3 symbols are of a length no typed label has."""
    folder = tmp_path_factory.mktemp("four_symbols")
    path = folder / "reader.keras"
    shutil.copy(READER, path)
    model.update_meta(path, {"label_lengths": [4, 4]})
    assert export_safe.main(["--in_keras", str(path), "--out_keras", str(folder / "reader.onnx"), "--format",
                             "onnx"]) == 0
    return path, folder / "reader.onnx"


cjk_font_needed = pytest.mark.skipif(not any(__import__("pathlib").Path(p).is_file() for p in synth.CJK_FONTS),
                                     reason="needs a CJK font: apt-get install fonts-wqy-microhei (.ci/run does)")


def captcha_like(height=60, width=160, seed=0):
    """Dark strokes on a light, slightly noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(220, 256, (60, 160), dtype=np.uint8)
    cv2.putText(image, "aB3", (10, 45), cv2.FONT_HERSHEY_SIMPLEX, 1.2, 40, 3)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def one_hot_probs(classes, num_classes=63, confidence=0.99):
    """(1, T, num_classes) softmax output that puts `confidence` on classes[t] at step t."""
    probs = np.full((1, len(classes), num_classes), (1 - confidence) / (num_classes - 1), np.float32)
    for t, c in enumerate(classes):
        probs[0, t, c] = confidence
    return probs


def labelled_and_unlabelled(root, labelled_name, copy_name):
    """60 labelled images of the fixture reader's look in ROOT/LABELLED_NAME and 120 more under numbers in
    ROOT/unlabelled (their truth kept aside), among them a copy of a labelled image named COPY_NAME.
    -> (labelled folder, unlabelled folder, {number file: truth})"""
    draw_folder(root / labelled_name, 60, seed=21)
    draw_folder(root / "drawn", 120, seed=22)
    unlabelled = root / "unlabelled"
    truth = as_unlabelled(root / "drawn", unlabelled)
    shutil.copy(sorted((root / labelled_name).iterdir())[0], unlabelled / copy_name)
    return root / labelled_name, unlabelled, truth
