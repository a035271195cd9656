"""modelfolder.py: a folder of models read by name and followed as files are added, replaced, removed or broken.
The looks are made by calling refresh(), so nothing here waits on a clock (serve.py's thread calls it)."""

import os
import shutil

import pytest

import reader
from conftest import READER_IMAGES
from modelfolder import ModelFolder, model_files


def confidences(captcha_reader):
    return [captcha_reader.read(path).confidence for path in READER_IMAGES[:4]]


@pytest.fixture
def folder(tmp_path, onnx_model, base_onnx):
    shutil.copy(onnx_model, tmp_path / "digits.onnx")
    shutil.copy(base_onnx, tmp_path / "base.onnx")
    return tmp_path


def test_each_model_is_read_by_its_name(folder, onnx_model, base_onnx):
    logged = []
    models = ModelFolder(folder, log=logged.append)
    models.refresh(settled_only=False)
    assert models.names() == ["base", "digits"]
    for name, path in (("digits", onnx_model), ("base", base_onnx)):
        assert confidences(models.get(name)) == pytest.approx(confidences(reader.Reader.load(path)), abs=1e-6)
    assert confidences(models.get("digits")) != pytest.approx(confidences(models.get("base")), abs=1e-3)
    described = models.describe()
    assert described["refused"] == {}
    assert described["models"]["digits"]["charset"]["symbols"] == "0123456789"
    assert described["models"]["base"]["file"] == "base.onnx" and described["models"]["base"]["answer"] == "text"
    with pytest.raises(KeyError):
        models.get("../digits")  # names are the folder's own, never a path
    assert sum("serving" in line for line in logged) == 2


def test_a_new_file_is_loaded_once_it_has_stopped_changing(folder, onnx_model):
    models = ModelFolder(folder, log=lambda line: None)
    models.refresh(settled_only=False)
    partial = folder / "late.onnx"
    partial.write_bytes(onnx_model.read_bytes()[:1000])  # a copy under way
    models.refresh()
    assert "late" not in models.names() and "late" not in models.describe()["refused"]  # not even tried
    shutil.copy(onnx_model, partial)  # the copy completes
    models.refresh()
    assert "late" not in models.names()  # changed since the last look
    models.refresh()
    assert "late" in models.names()


def test_copies_in_progress_are_passed_over(folder, onnx_model):
    for name in (".hidden.onnx", "site.onnx.part", "site.onnx.tmp", "notes.txt"):
        shutil.copy(onnx_model, folder / name)
    assert sorted(model_files(folder)) == ["base", "digits"]


def test_a_replaced_file_swaps_its_model_and_a_held_one_still_reads(folder, thresholded_reader):
    models = ModelFolder(folder, log=lambda line: None)
    models.refresh(settled_only=False)
    before = models.get("digits")
    assert before.low_rule.threshold == 0.0
    staged = folder / ".digits.onnx.tmp"
    shutil.copy(thresholded_reader[1], staged)
    os.replace(staged, folder / "digits.onnx")  # an atomic rename, as train.py and export_safe.py write
    models.refresh()
    models.refresh()
    after = models.get("digits")
    assert after is not before and after.low_rule.threshold == pytest.approx(thresholded_reader[2])
    assert before.read(READER_IMAGES[0]).text == READER_IMAGES[0].stem  # a request that took it finishes on it


def test_a_removed_file_is_no_longer_served(folder):
    models = ModelFolder(folder, log=lambda line: None)
    models.refresh(settled_only=False)
    (folder / "base.onnx").unlink()
    models.refresh()
    assert models.names() == ["digits"]


def test_a_broken_file_is_refused_in_one_line_and_the_others_serve(folder):
    logged = []
    models = ModelFolder(folder, log=logged.append)
    models.refresh(settled_only=False)
    (folder / "broken.onnx").write_bytes(b"not a model at all")
    (folder / "digits.onnx").write_bytes(b"\x08\x01garbage")  # a serving model's file replaced by a broken one
    models.refresh()
    models.refresh()
    refused = models.describe()["refused"]
    assert set(refused) == {"broken", "digits"} and "broken.onnx" in refused["broken"]
    assert models.names() == ["base", "digits"]  # digits keeps its last good model
    assert models.get("digits").read(READER_IMAGES[0]).text == READER_IMAGES[0].stem
    refusals = [line for line in logged if line.startswith("refused")]
    assert len(refusals) == 2 and all("\n" not in line for line in refusals)
    assert "keeps serving" in next(line for line in refusals if "digits" in line)
    models.refresh()  # refused as it is: not tried again at every look
    assert len([line for line in logged if line.startswith("refused")]) == 2


def test_a_name_with_a_keras_file_is_read_from_it(tmp_path, onnx_model):
    from conftest import READER

    shutil.copy(READER, tmp_path / "site.keras")
    shutil.copy(onnx_model, tmp_path / "site.onnx")  # an export, not its twin: reader.load reads the .keras file
    models = ModelFolder(tmp_path, log=lambda line: None)
    models.refresh(settled_only=False)
    assert models.names() == ["site"] and models.describe()["models"]["site"]["file"] == "site.keras"
    assert type(models.get("site").network).__name__ != "OnnxNetwork"
    assert models.get("site").read(READER_IMAGES[0]).text == READER_IMAGES[0].stem


def test_a_missing_folder_is_one_error(tmp_path):
    with pytest.raises(reader.CaptchaError, match="models folder does not exist"):
        ModelFolder(tmp_path / "nowhere")
