"""Arithmetic captchas: the safe evaluator, the synthetic style, and answers through test.py and serve.py."""

import json
import shutil

import pytest
from test_serve import call, multipart, serving

import arithmetic
import label_sources
import model
import synth
import test as read_captchas  # the project's test.py (reads captchas), not a test module
from conftest import READER, READER_IMAGES


@pytest.mark.parametrize("reading, expression, value", [
    ("3+5=?", "3+5", "8"), ("12×4=", "12*4", "48"), ("12x4=?", "12*4", "48"), ("12X4", "12*4", "48"),
    ("９÷３＝？", "9/3", "3"), ("７－２＝？", "7-2", "5"), ("7÷2=?", "7/2", "3.5"), ("42-2", "42-2", "40"),
    ("05+3=", "5+3", "8"), ("3 + 5 = ?", "3+5", "8"), ("(2+3)*4", "(2+3)*4", "20"), ("2+3*4=", "2+3*4", "14"),
    ("三加五等于", "3+5", "8"), ("十二减二十=?", "12-20", "-8"), ("二十五乘三等于？", "25*3", "75"), ("1", "1", "1"),
])
def test_expressions_as_drawn_are_computed(reading, expression, value):
    assert arithmetic.answer(reading) == (expression, value, None)


@pytest.mark.parametrize("reading, error", [
    ("8÷0=", "division by zero"), ("3+", "does not parse"), ("abc", "symbols that are not arithmetic: a b c"),
    ("3=5", "symbols that are not arithmetic: ="), ("", "no expression"), ("=?", "no expression"),
    ("2**3", "not an expression of numbers"), ("9**9**9**9", "not an expression of numbers"),  # no powers at all
    ("1(2)", "not an expression of numbers"), ("(" * 30 + "1" + ")" * 30, "61 characters"),
    ("9" * 10 + "+1", "a number over 9 digits"), ("__import__('os')", "symbols that are not arithmetic"),
    ("十十", "a Chinese number it cannot read"),
])
def test_malformed_and_hostile_readings_get_no_value_and_say_why(reading, error):
    result = arithmetic.answer(reading)
    assert result.value is None and error in result.error


def test_the_largest_expression_allowed_is_computed_exactly():
    assert arithmetic.answer("999999999*999999999*999999999*99999")[1] == str(999999999 ** 3 * 99999)


def test_the_synthetic_style_draws_every_operator_and_labels_each_image_in_a_labels_file(tmp_path):
    written = synth.generate_synthetic(tmp_path / "a", 60, synth.Drawing(style="arithmetic"), seed=3, workers=1, progress=False)
    found = label_sources.find_labels(tmp_path / "a", labels_file=tmp_path / "a" / "labels.csv")
    assert [path for path, _ in found.samples] == [str(p) for p in written] and found.skipped == {}
    expressions = [label for _, label in found.samples]
    assert set("".join(expressions)) >= set("+-×x÷=?")
    assert any(e.endswith("=?") for e in expressions) and any(e.endswith("=") and "?" not in e for e in expressions)
    answers = [arithmetic.answer(e).value for e in expressions]
    assert all(value is not None and value.isdigit() for value in answers)  # whole answers of at least 0
    assert {len(e.split("=")[0]) for e in expressions} >= {3, 5}  # one- and two-digit operands


def test_the_synthetic_style_turns_operators_little_and_digits_as_the_captcha_package_does(tmp_path, monkeypatch):
    """A + turned 30 degrees is a × turned -15: operators are drawn nearly upright, so that they can be told apart."""
    import captcha.image
    from PIL import Image

    turns, drawing = [], []
    draw_character, rotate = captcha.image.ImageCaptcha._draw_character, Image.Image.rotate

    def spy_draw(self, c, *args):
        drawing.append(c)
        return draw_character(self, c, *args)

    def spy_rotate(self, angle, *args, **kwargs):
        turns.append((drawing[-1], angle))
        return rotate(self, angle, *args, **kwargs)

    monkeypatch.setattr(captcha.image.ImageCaptcha, "_draw_character", spy_draw)
    monkeypatch.setattr(Image.Image, "rotate", spy_rotate)
    synth.generate_synthetic(tmp_path / "a", 40, synth.Drawing(style="arithmetic"), seed=3, workers=1, progress=False)
    operators = [abs(angle) for c, angle in turns if c in synth.ARITHMETIC_OPERATORS + "=?"]
    digits = [abs(angle) for c, angle in turns if c.isdigit()]
    assert len(operators) >= 80 and max(operators) <= synth.OPERATOR_TURN
    assert max(digits) > 20  # digits keep the package's turn of up to 30 degrees


@pytest.fixture
def expressions_folder(tmp_path):
    """The reader's images labelled with expressions whose value is what the image shows (one drawn otherwise)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in READER_IMAGES[:3]:
        shutil.copy(path, folder / path.name)
    first, second, third = (path.stem for path in READER_IMAGES[:3])
    rows = [(f"{first}.png", f"{first}=?"), (f"{second}.png", f"{int(second) - 4}+4="),
            (f"{third}.png", f"{third}+1=?")]  # the last: read as the bare number, so its answer is off by one
    (tmp_path / "labels.csv").write_text("".join(f"{name},{label}\n" for name, label in rows))
    return folder, tmp_path / "labels.csv"


def test_test_py_prints_answers_and_scores_them_against_the_labels_expressions(expressions_folder, tmp_path, capsys):
    folder, labels_file = expressions_folder
    output = tmp_path / "readings.json"
    assert read_captchas.main(["--model", str(READER), "--folder", str(folder), "--labels", str(labels_file),
                               "--answer", "arithmetic", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    first = READER_IMAGES[0].stem
    assert f"-> {first} = {int(first)} (" in out
    assert "answers right: 2 of 3 (0.6667)" in out  # the labels are expressions: no exact match of this model's
    readings = json.loads(output.read_text())["readings"]
    assert [r["answer"] for r in readings] == [str(int(p.stem)) for p in READER_IMAGES[:3]]


def test_a_model_trained_for_arithmetic_answers_so_in_test_py_and_serve_py(tmp_path, capsys):
    arithmetic_reader = tmp_path / "arith.keras"
    model.copy_with_meta(READER, arithmetic_reader, {"answer": "arithmetic"})
    image = READER_IMAGES[0]
    assert read_captchas.main(["--model", str(arithmetic_reader), "--image", str(image)]) == 0
    assert f"-> {image.stem} = {int(image.stem)}" in capsys.readouterr().out  # no flag: the stored answer mode
    with serving(arithmetic_reader) as url:
        status, answer = call(f"{url}/read", *multipart("image", [(image.name, image.read_bytes())]))
        assert status == 200 and answer["answer"] == str(int(image.stem)) and answer["expression"] == image.stem
        assert call(f"{url}/model")[1]["answer"] == "arithmetic"
    with serving(READER, "--answer", "text") as url:
        status, answer = call(f"{url}/read", *multipart("image", [(image.name, image.read_bytes())]))
        assert status == 200 and "answer" not in answer


def test_a_reading_with_no_answer_is_low_with_its_reason(tmp_path):
    import cv2
    import numpy as np

    blank = cv2.imencode(".png", np.full((48, 160), 255, np.uint8))[1].tobytes()  # the reader reads nothing here
    with serving(READER, "--answer", "arithmetic", "--min_confidence", "0") as url:
        status, answer = call(f"{url}/read", *multipart("image", [("blank.png", blank)]))
    assert status == 200 and answer["text"] == ""
    assert answer["answer"] is None and answer["reason"] == "no expression" and answer["low_confidence"] is True


def test_train_py_trains_on_expressions_from_a_labels_file_and_stores_the_answer_mode(tmp_path, capsys):
    import modelmeta
    import train

    folder = tmp_path / "a"
    synth.generate_synthetic(folder, 24, synth.Drawing(style="arithmetic"), seed=5, workers=1, progress=False)
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(folder), "--labels", str(folder / "labels.csv"), "--answer", "arithmetic",
                       "--preset", "tiny", "--init_from", "none", "--epochs", "1", "--batch_size", "8",
                       "--workers", "1", "--out", str(out)]) == 0
    meta = modelmeta.read_meta(out / "crnn_ctc_best.keras")
    assert meta["answer"] == "arithmetic" and set(meta["charset"]["symbols"]) >= set("+-×x÷=?0123456789")
    capsys.readouterr()
    assert train.main(["--data_dir", str(folder), "--labels", str(folder / "labels.csv"), "--answer", "sum",
                       "--out", str(tmp_path / "refused")]) == 2
    assert "unknown --answer 'sum'" in capsys.readouterr().err and not (tmp_path / "refused").exists()
