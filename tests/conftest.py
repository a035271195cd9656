"""Shared fixtures: tiny seeded data and one tiny trained model, made once per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import runstate  # noqa: E402
import synth  # noqa: E402

DIGITS = "0123456789"


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
def onnx_model(tmp_path_factory, trained_run):
    """trained_run's best model exported to ONNX (export_safe.py --format onnx)."""
    import export_safe

    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export_safe.main(["--in_keras", str(trained_run / runstate.BEST_NAME), "--out_keras", str(path),
                             "--format", "onnx"]) == 0
    return path
