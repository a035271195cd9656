"""twin.py: a .keras model's ONNX twin, written when a run ends and read in its place while it is the same model,
so that reading a captcha with a .keras file loads no TensorFlow."""

import json
import shutil
import subprocess
import sys

import pytest

import model
import reader
import runstate
import train
import twin
from conftest import READER, READER_IMAGES, ROOT

pytestmark = pytest.mark.twin

READ_ONE = """
import sys
import reader
captcha_reader = reader.Reader(sys.argv[1])
print(captcha_reader.read(sys.argv[2]).text)
print("tensorflow" in sys.modules, "keras" in sys.modules)
"""


@pytest.fixture(scope="module")
def with_twin(tmp_path_factory):
    path = tmp_path_factory.mktemp("twin") / "reader.keras"
    shutil.copy(READER, path)
    assert twin.write_twin(path) == path.with_suffix(".onnx")
    return path


def read_in_a_new_process(model_path, image):
    result = subprocess.run([sys.executable, "-c", READ_ONE, str(model_path), str(image)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text, imported = result.stdout.splitlines()[-2:]
    return text, imported


def test_a_keras_model_with_its_twin_reads_alike_without_tensorflow(with_twin):
    network, meta = reader.load(with_twin)
    assert isinstance(network, reader.OnnxNetwork) and twin.is_twin_of(meta, with_twin)
    through_twin = [reading.text for reading in reader.Reader(with_twin).read_paths(READER_IMAGES)]
    keras_network, _ = model.load_model(with_twin)
    assert not isinstance(keras_network, reader.OnnxNetwork)
    assert through_twin == [path.stem for path in READER_IMAGES]  # the committed reader reads its images exactly
    assert read_in_a_new_process(with_twin, READER_IMAGES[0]) == (READER_IMAGES[0].stem, "False False")


def test_a_twin_is_refused_when_it_is_not_the_same_model(with_twin, tmp_path):
    changed = tmp_path / "reader.keras"
    shutil.copy(with_twin, changed)
    shutil.copy(with_twin.with_suffix(".onnx"), tmp_path / "reader.onnx")
    assert isinstance(reader.load(changed)[0], reader.OnnxNetwork)  # a byte-for-byte copy is the same model
    model.update_meta(changed, {"abstain": None})  # its metadata rewritten: no longer the file the twin was made from
    network, meta = reader.load(changed)
    assert not isinstance(network, reader.OnnxNetwork) and meta["abstain"] is None
    text, imported = read_in_a_new_process(changed, READER_IMAGES[0])
    assert text == READER_IMAGES[0].stem and imported == "True True"  # read by Keras itself
    (tmp_path / "reader.onnx").write_bytes(b"not a model")  # a broken twin is no twin either
    assert not isinstance(reader.load(changed)[0], reader.OnnxNetwork)


def test_a_run_writes_the_twin_of_its_model(digits_folder, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "1", "--batch_size", "8",
                       "--charset", "digits", "--workers", "1", "--out", str(out)]) == 0
    best = out / runstate.BEST_NAME
    assert twin.is_twin_of(reader.load_onnx(best.with_suffix(".onnx"))[1], best)
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == str(best)


def test_a_twin_that_is_already_the_same_model_is_not_converted_again(with_twin, monkeypatch):
    import export_safe

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(export_safe, "save_onnx", no_conversion)
    assert twin.write_twin(with_twin) == with_twin.with_suffix(".onnx")  # the self-training run's copied twin


@pytest.mark.parametrize("offset, kept", [(5e-4, True), (5e-3, False)])
def test_a_twin_is_written_only_within_its_tolerance(tmp_path, monkeypatch, offset, kept):
    """A twin a little further from Keras than an export may be (a 1,000-symbol softmax moves by more than 1e-4) is
    kept; one that reads further off than TWIN_TOLERANCE is removed and the .keras file is read."""
    path = tmp_path / "reader.keras"
    shutil.copy(READER, path)
    predict = reader.OnnxNetwork.predict_on_batch
    monkeypatch.setattr(reader.OnnxNetwork, "predict_on_batch", lambda self, images: predict(self, images) + offset)
    assert (twin.write_twin(path) is not None) == kept
    assert path.with_suffix(".onnx").exists() == kept
