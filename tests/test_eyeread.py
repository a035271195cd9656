"""eyeread.py: numbered sheets of a seeded sample without their labels, and the typed readings scored
against the labels and beside a model's readings of the same images."""

import json
from pathlib import Path

import cv2

import synth
from tools import eyeread

DIGITS = "0123456789"


def sheets(tmp_path, name="eye", count=5, seed=1):
    folder = tmp_path / "captchas"
    if not folder.exists():
        synth.generate_synthetic(folder, 7, synth.Drawing(style="hershey", symbols=DIGITS, length=4), seed=5, workers=1, progress=False)
    out = tmp_path / name
    assert eyeread.main(["sheets", str(folder), "--out", str(out), "--count", str(count), "--seed", str(seed)]) == 0
    return out, json.loads((out / eyeread.SAMPLE_NAME).read_text())["samples"]


def test_sheets_hold_a_seeded_sample_and_a_form_with_a_line_for_each_image(tmp_path):
    out, sample = sheets(tmp_path)
    _, again = sheets(tmp_path, name="again")
    _, other = sheets(tmp_path, name="other", seed=2)
    assert [s["path"] for s in sample] == [s["path"] for s in again]  # the same seed, the same images
    assert [s["path"] for s in sample] != [s["path"] for s in other]
    assert len(sample) == 5 and all(s["label"] == Path(s["path"]).stem for s in sample)
    sheet = cv2.imread(str(out / "sheet_1.png"))  # 5 images, 3 to a row: 2 rows
    assert sheet.shape[0] == 2 * (eyeread.NUMBER_BAND + eyeread.TILE_HEIGHT)
    assert sheet.shape[1] == eyeread.SHEET_COLUMNS * (eyeread.TILE_WIDTH + 10)
    assert (out / eyeread.READINGS_NAME).read_text().splitlines() == ["1: ", "2: ", "3: ", "4: ", "5: "]


def test_the_score_sets_the_eye_beside_the_model_on_the_same_images_and_leaves_out_marked_ones(tmp_path):
    out, sample = sheets(tmp_path)
    labels = [s["label"] for s in sample]
    typed = [labels[0], "0000" if labels[1] != "0000" else "1111", "", "-", labels[4]]
    (out / eyeread.READINGS_NAME).write_text("".join(f"{i}: {text}\n" for i, text in enumerate(typed, 1)))
    wrong = "x"  # the model right on images 1 and 3, wrong on 2, 4 and 5
    model = {"readings": [{"path": s["path"], "prediction": s["label"] if i in (0, 2) else wrong}
                          for i, s in enumerate(sample)]}
    (out / "model.json").write_text(json.dumps(model))

    result = eyeread.score(out, out / "model.json")
    assert (result["images"], result["left_out"]) == (4, 1)  # image 4 marked "-"
    assert result["eye"]["exact_match"] == 0.5  # images 1 and 5 of 1, 2, 3, 5; the blank one counts wrong
    assert result["model"]["exact_match"] == 0.5  # images 1 and 3
    assert result["both"] == {"right": 1, "eye_only": 1, "model_only": 1, "neither": 1}
    assert json.loads((out / eyeread.SCORE_NAME).read_text()) == result


def test_a_form_without_a_line_for_every_image_is_refused_in_one_line(tmp_path, capsys):
    out, _ = sheets(tmp_path)
    (out / eyeread.READINGS_NAME).write_text("1: 1234\n2: 1234\n4: 1234\n5: 1234\n")
    assert eyeread.main(["score", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "readings.txt" in err[0] and "image(s) 3" in err[0]


def test_sheets_never_replace_readings_typed_into_the_same_folder(tmp_path, capsys):
    out, sample = sheets(tmp_path)
    typed = "".join(f"{i}: {s['label']}\n" for i, s in enumerate(sample, 1))
    (out / eyeread.READINGS_NAME).write_text(typed)
    folder = tmp_path / "captchas"
    assert eyeread.main(["sheets", str(folder), "--out", str(out), "--count", "5", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds typed readings" in err[0]
    assert (out / eyeread.READINGS_NAME).read_text() == typed
