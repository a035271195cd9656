"""test.py, the script that reads captchas: one image, a folder, scores, CSV and JSON output, one-line errors."""

import csv
import json

import numpy as np

import label_sources
import model
import imagefiles
import preprocess
import reader
import runstate
import test as read_captchas  # the project's test.py (reads captchas), not a test module
from conftest import (
    READER,
    READER_IMAGES,
    TINY,
    assert_one_line_error,
    run_script,
)
from charsets import Charset


def expected_texts(model_path, paths):
    crnn, meta = model.load_model(model_path)
    options = preprocess.PreprocessOptions.from_dict(meta["preprocess"])
    images = np.stack([preprocess.load_image(p, options) for p in paths])
    return reader.decode(crnn.predict_on_batch(images), Charset.from_dict(meta["charset"]))


def test_read_one_image(capsys):
    image = READER_IMAGES[0]
    assert read_captchas.main(["--model", str(READER), "--image", str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{image} -> {image.stem} (")  # the committed reader reads it exactly
    assert lines[1].startswith("1 labelled image: exact match 1.0000")


def test_read_a_folder_with_limit_csv_debug_and_a_broken_file(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    images = READER_IMAGES[:5]
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "00000.png").write_bytes(b"broken")  # sorts first; must not stop the rest
    code = read_captchas.main(["--model", str(READER), "--folder", str(folder), "--limit", "5", "--batch_size", "2",
                               "--output", str(tmp_path / "out.csv"), "--save_debug", str(tmp_path / "debug")])
    assert code == 0
    captured = capsys.readouterr()
    assert "00000.png: not a readable image" in captured.err
    predicted = [line.rsplit(" (", 1)[0] for line in captured.out.splitlines() if " -> " in line]  # less confidence
    readable = sorted(folder / image.name for image in images)[:4]
    truths = [p.stem for p in readable]  # the committed reader reads them exactly
    assert predicted == [f"{path} -> {text}" for path, text in zip(readable, truths)]
    assert "4 labelled images: exact match 1.0000" in captured.out
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["prediction"] for row in rows] == truths and [row["label"] for row in rows] == truths
    stages = sorted(p.name for p in (tmp_path / "debug").glob(f"{readable[0].stem}_*.png"))
    assert stages == [f"{readable[0].stem}_{s}.png" for s in ("0_gray", "3_resize_pad", "4_clahe")]  # no crop: as trained


def test_only_file_names_that_are_labels_of_the_model_are_scored(trained_run, digits_folder, tmp_path, capsys):
    """The model reads digits, up to 4: IMG_1234.png and 12345.png are read but not scored against 'IMG' or '12345'."""
    folder = tmp_path / "named"
    folder.mkdir()
    image = imagefiles.list_images(digits_folder)[0]
    for name in ["IMG_1234.png", "12345.png", f"{label_sources.label_from_filename(image)}.png"]:
        (folder / name).write_bytes(image.read_bytes())
    model_path = trained_run / runstate.BEST_NAME
    assert read_captchas.main(["--model", str(model_path), "--folder", str(folder)]) == 0
    out = capsys.readouterr().out
    text = expected_texts(model_path, [image])[0]
    exact = float(text == label_sources.label_from_filename(image))
    assert f"1 labelled image: exact match {exact:.4f} ({exact:.4f} ignoring case)" in out
    assert ("not scored, file name not a label of this model: 1 longer than the model's 4 characters "
            "(e.g. 12345.png), 1 symbols outside the model's charset (GIM_) (e.g. IMG_1234.png); --labels FILE or "
            "--labels_from RULE scores them otherwise") in out


def test_test_py_user_errors_are_one_line(trained_run, tmp_path):
    legacy = tmp_path / "legacy.keras"
    model.build_model(TINY, 63, legacy_lambda=True).save(legacy)
    image = tmp_path / "x.png"
    image.write_bytes(READER_IMAGES[0].read_bytes())  # a readable image: the model is what is wrong
    assert_one_line_error(run_script("test.py", "--model", tmp_path / "none.keras", "--image", image),
                          "none.keras", "does not exist")
    assert_one_line_error(run_script("test.py", "--model", legacy, "--image", image), "legacy.keras", "export_safe.py")
    assert_one_line_error(run_script("test.py", "--model", trained_run / runstate.BEST_NAME, "--folder", tmp_path / "no"),
                          "folder does not exist")
    assert_one_line_error(run_script("test.py", "--model", trained_run / runstate.BEST_NAME, "--image", image,
                                     "--charset", "default"), "crnn_ctc_best.keras", "reads '0123456789'")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    assert_one_line_error(run_script("test.py", "--model", junk, "--image", image), "junk.keras", "not a Keras")


def test_test_py_marks_low_readings_by_the_stored_threshold_unless_told(thresholded_reader, tmp_path, capsys):
    keras_path, _, threshold = thresholded_reader
    output = tmp_path / "readings.json"
    assert read_captchas.main(["--model", str(keras_path), "--folder", str(READER_IMAGES[0].parent),
                               "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["readings"]
    assert [row["low_confidence"] for row in rows] == [row["confidence"] < threshold for row in rows]
    assert sum(row["low_confidence"] for row in rows) == 4
    assert "4 of 8 readings marked low" in capsys.readouterr().out
    assert read_captchas.main(["--model", str(keras_path), "--folder", str(READER_IMAGES[0].parent),
                               "--output", str(output), "--min_confidence", "0"]) == 0
    assert not any(row["low_confidence"] for row in json.loads(output.read_text())["readings"])


def test_json_output_confidence_threshold_and_review_folder(tmp_path, capsys):
    # the committed reader reads its images right and at lengths it allows, so only the threshold marks them low
    folder = READER_IMAGES[0].parent
    review = tmp_path / "review"
    args = ["--model", str(READER), "--folder", str(folder)]
    assert read_captchas.main([*args, "--output", str(tmp_path / "all.json")]) == 0
    readings = json.loads((tmp_path / "all.json").read_text())["readings"]
    confidences = sorted(r["confidence"] for r in readings)
    middle = len(confidences) // 2
    assert confidences[middle - 1] < confidences[middle]
    threshold = (confidences[middle - 1] + confidences[middle]) / 2  # half fall below it, none on it
    capsys.readouterr()
    assert read_captchas.main([*args, "--min_confidence", str(threshold), "--review_dir", str(review),
                               "--output", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    rows = saved["readings"]
    assert [r["confidence"] for r in rows] == [r["confidence"] for r in readings]
    assert all(0.0 < r["confidence"] <= 1.0 for r in rows)
    assert [r["low_confidence"] for r in rows] == [r["confidence"] < threshold for r in rows]
    low = sum(r["low_confidence"] for r in rows)
    assert 0 < low < len(rows) and f"{low} of {len(READER_IMAGES)} readings marked low" in out
    assert saved["scores"]["count"] == len(READER_IMAGES) and saved["settings"]["min_confidence"] == threshold
    expected = sorted(f"{r['prediction']}__{r['path'].split('/')[-1]}" for r in rows
                      if r["low_confidence"] or r["prediction"] != r["label"])
    assert expected and sorted(p.name for p in review.iterdir()) == expected
    copied = review / expected[0]
    assert copied.read_bytes() == (folder / expected[0].split("__", 1)[1]).read_bytes()


def test_an_image_that_cannot_be_read_is_one_line_and_a_failure(onnx_model, tmp_path, capsys):
    broken = tmp_path / "1234.png"
    broken.write_bytes(b"not an image")
    assert read_captchas.main(["--model", str(onnx_model), "--image", str(broken)]) == 2
    captured = capsys.readouterr()
    assert f"skipped: {broken}: not a readable image" in captured.err and " -> " not in captured.out


def test_csv_output_has_confidence_and_allowed_symbols_restrict_test_py(trained_run, digits_folder, tmp_path, capsys):
    model_path = trained_run / runstate.BEST_NAME
    args = ["--model", str(model_path), "--folder", str(digits_folder), "--limit", "12"]
    assert read_captchas.main([*args, "--allowed", "12", "--output", str(tmp_path / "out.csv")]) == 0
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "prediction", "confidence", "low_confidence", "label"]
    assert len(rows) == 12 and all(set(r["prediction"]) <= set("12") for r in rows)
    assert all(0.0 < float(r["confidence"]) <= 1.0 for r in rows)
    capsys.readouterr()
    assert read_captchas.main([*args, "--allowed", "12a"]) == 2
    assert "--allowed '12a': the model cannot read 'a'" in capsys.readouterr().err
