"""The measuring tools: tools/bench.py (recipes against each other), tools/speed.py (loader, step, server) and
tools/oneimage.py (one captcha read by a new process)."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import dataset
import model
import charsets
import reader
import runstate
import train
from conftest import DIGITS, READER, READER_IMAGES
from tools import bench, student_filters


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


def test_bench_compares_recipes_and_writes_curves_and_models(tmp_path, capsys):
    code = bench.main(["--runs", "plain=tiny:reference@0.1,tuned=tiny:default@0.1", "--train_count", "48", "--style", "gregwar",
                       "--test_count", "8", "--charset", DIGITS, "--length", "3", "--eval_minutes", "0.05",
                       "--slice_seconds", "2", "--data_root", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert code == 0
    results = json.loads((tmp_path / "out" / "bench.json").read_text())["results"]
    assert [r["name"] for r in results] == ["plain", "tuned"]
    for r in results:
        # a busy machine may fit fewer slices, so only what holds under any load: the budget was spent, and scored
        assert len(r["curve"]) >= 1 and r["minutes"] >= 0.1 and r["curve"][-1]["minutes"] == r["minutes"]
        assert r["train_images_per_second"] > 0 and {"exact_match", "exact_match_ignore_case", "cer"} <= set(r)
        model.load_model(tmp_path / "out" / f"{r['name']}.keras")
    with Image.open(tmp_path / "out" / "bench_curves.png") as picture:
        assert picture.format == "PNG"
    printed = capsys.readouterr().out
    assert "| plain | tiny | reference |" in printed and "gregwar-style captchas" in printed
    assert len(list((tmp_path / "data").glob("gregwar_*/train_48/*.jpg"))) == 48


def test_bench_runs_on_a_real_folder_with_the_keras_io_contender(digits_folder, trained_run, tmp_path, capsys):
    """The keras-io recipe from scratch against a default-recipe run that starts from a model (as train.py's
    default starts from the base model: `+base`; here a small trained model, `+PATH`)."""
    out, start = tmp_path / "out", trained_run / runstate.BEST_NAME
    assert bench.main(["--data_dir", str(digits_folder), "--runs", f"kerasio=kerasio:kerasio@0.05,ours=tiny:default+{start}@0.05",
                       "--eval_minutes", "0.05", "--slice_seconds", "2", "--out", str(out)]) == 0
    samples = dataset.scan_folder(digits_folder).samples
    defaults = train.TrainConfig()
    _, _, test = dataset.split_samples(samples, defaults.val_fraction, defaults.test_fraction, defaults.seed)
    printed = capsys.readouterr().out
    assert f"/ {len(test)} test images of {digits_folder}" in printed  # train.py's own test split
    assert f"ours: as {start}, from its weights" in printed and "kerasio: preset kerasio, from scratch" in printed
    results = {r["name"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    assert set(results) == {"kerasio", "ours"} and results["kerasio"]["recipe"] == "kerasio"
    assert (results["ours"]["start_from"], results["kerasio"]["start_from"]) == (str(start), "none")
    # the fine-tuned contender kept the start's pixels and began from its weights, not from a fresh network
    source, source_meta = model.load_model(start)
    ours, ours_meta = model.load_model(out / "ours.keras")
    assert ours_meta["preprocess"] == source_meta["preprocess"]
    fresh = model.build_model(model.ModelConfig.from_dict(source_meta["model_config"]), 11)
    first_kernel = [next(w for w in m.weights if len(w.shape) == 4).numpy() for m in (source, ours, fresh)]
    moved, unrelated = (np.abs(first_kernel[0] - k).mean() for k in first_kernel[1:])
    assert moved < 0.5 * unrelated, (moved, unrelated)
    kerasio, meta = model.load_model(out / "kerasio.keras")
    assert kerasio.count_params() == model.build_model(model.PRESETS["kerasio"], 11).count_params()
    assert meta["charset"]["symbols"] == charsets.charset_of_labels([label for _, label in samples]).symbols
    assert (meta["preprocess"]["resize"], meta["preprocess"]["clahe_clip"]) == ("stretch", 0)  # keras-io's pixels


def test_bench_names_a_missing_start_model_in_one_line(digits_folder, tmp_path, capsys):
    missing = tmp_path / "nope.keras"
    assert bench.main(["--data_dir", str(digits_folder), "--runs", f"x=tiny:default+{missing}", "--out",
                       str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{missing}: no such model file to start from" in error


def test_student_filters_counts_the_pseudo_labels_each_rule_keeps_and_how_many_are_right(tmp_path, capsys):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for image in READER_IMAGES:
        shutil.copy(image, folder / image.name)
    truth = tmp_path / "truth.csv"
    rows = ["file,label"] + [f"{image.name},{image.stem}" for image in READER_IMAGES]
    rows[1] = f"{READER_IMAGES[0].name},zz{READER_IMAGES[0].stem}"  # one label the reader cannot match
    truth.write_text("\n".join(rows) + "\n")
    assert student_filters.main([str(READER), str(folder), str(truth), "--copies", "1"]) == 0
    table = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:3] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and "---" not in line}
    count = len(READER_IMAGES)
    assert table["every reading"] == [str(count), str(count - 1)]  # the reader reads its images right
    steady = table["and 1 augmented copies read the same (--augmented_agreement 1)"]
    assert int(steady[0]) <= count and int(steady[1]) <= int(steady[0])

    truth.write_text("\n".join(rows[:-1]) + "\n")  # an image with no label: refused in one line
    assert student_filters.main([str(READER), str(folder), str(truth)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {truth}: no label for 1 images")


@pytest.mark.twin
def test_oneimage_reads_through_the_twin_and_through_keras_and_puts_the_twin_back(tmp_path, capsys):
    import re

    import twin
    from tools import oneimage

    path = tmp_path / "reader.keras"
    shutil.copy(READER, path)
    assert oneimage.main([str(path), "--image", str(READER_IMAGES[0]), "--repeats", "1"]) == 2  # no twin yet
    assert "its ONNX twin reader.onnx beside it" in capsys.readouterr().err
    twin.write_twin(path)
    assert oneimage.main([str(path), "--image", str(READER_IMAGES[0]), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for variant in ("its ONNX twin", r"Keras \(the twin set aside\)"):
        assert re.search(rf"through {variant}: median [\d.]+ s a process .* peak memory \d+ MB", out), out
    assert twin.is_twin_of(reader.load_onnx(twin.twin_path(path))[1], path)  # put back, unchanged


def test_oneimage_reads_an_onnx_model_through_the_python_api_and_test_py(onnx_model, capsys):
    from tools import oneimage

    assert oneimage.main([str(onnx_model), "--image", str(READER_IMAGES[0]), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for variant in ("the Python API", "test.py"):
        assert re.search(rf"^{variant}: median [\d.]+ s a process .* peak memory \d+ MB", out, re.MULTILINE), out


def test_manymodels_serves_copies_of_a_model_and_replaces_one_under_load(onnx_model, base_onnx, capsys):
    from tools import manymodels

    assert manymodels.main([str(onnx_model), "--replacement", str(base_onnx), "--folder",
                            str(READER_IMAGES[0].parent), "--models", "3", "--clients", "2", "--requests", "40"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^1 model: \d+ MB resident; 40 requests from 2 clients: \d+ requests/s \(0 failed\)", out, re.M)
    assert re.search(r"^3 models: \d+ MB resident, -?[\d.]+ MB per extra model; .* of one model's \(0 failed\)", out, re.M)
    assert re.search(r"^replaced under load: \d+ requests, 0 failed; the new model answered [\d.]+ s after", out, re.M)
