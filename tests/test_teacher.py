"""Zero labels: a teacher's readings of unlabelled captchas, filtered into pseudo-labels that start self-training
(teacher.py, selftrain.py), scored on a check folder people labelled; and the teacher at reading time."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from make_reader import draw_folder  # the fixture reader's own look

import model
import modelmeta
import reader
import runstate
import selftrain
import teacher as teachers
import test as read_captchas  # the project's test.py (reads captchas), not a test module
import train
from conftest import (
    READER,
    READER_IMAGES,
    as_unlabelled,
    labelled_and_unlabelled,
    run_stopped_while_round_one_is_scored,
)
from teacher import TeacherReading

# ----------------------------------------------------------------------------- the filters


def test_each_filter_drops_what_it_says_and_counts_it():
    readings = [TeacherReading("a", "AB12", "ab12"),  # the two readers agree once case is folded
                TeacherReading("b", "ab12", "ab13"),  # they disagree
                TeacherReading("c", "ab1", "ab1"),  # a length the labels do not have
                TeacherReading("d", "ab1#", "ab1#"),  # a symbol the labels do not use
                TeacherReading("e", "", "ab12"),  # nothing read
                TeacherReading("f", "ba21", "ba21", confidence=0.2)]  # below the confidence threshold
    filtered = teachers.filter_readings(readings, "lower", lengths={4}, symbols=set("ab12"), min_confidence=0.5)
    assert filtered.kept == [("a", "ab12")]
    assert filtered.dropped == {"the two readers disagree": 1, "a length the site's labels do not have": 1,
                                "a symbol the site's labels do not use": 1, "nothing read": 1,
                                "below the teacher's confidence threshold": 1}
    assert "1 of 6 readings kept" in filtered.describe(6)


def test_without_a_check_folder_the_lengths_and_symbols_are_the_typical_ones_of_the_agreed_readings():
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefgh"), 5)) for _ in range(60)]
    readings = [TeacherReading(str(i), text, text) for i, text in enumerate(texts)]
    readings += [TeacherReading("short", "abcd", "abcd"),  # 1 of 63: not a typical length
                 TeacherReading("odd", "abc#e", "abc#e"),  # '#' in 1 reading: not a typical symbol
                 TeacherReading("disagreed", "zzzzz", "yyyyy")]  # disagreeing readings choose nothing
    filtered = teachers.filter_readings(readings, "keep")
    assert filtered.lengths == {5} and filtered.symbols == set("abcdefgh")
    assert sorted(path for path, _ in filtered.kept) == sorted(map(str, range(60)))


def test_the_teachers_confidence_threshold_is_chosen_on_the_check_folder():
    truth = {str(i): "ab12" for i in range(20)}
    # the 10 most confident readings are right, the 10 least confident wrong
    readings = [TeacherReading(str(i), "ab12" if i < 10 else "ab21", None, 1.0 - i / 100) for i in range(20)]
    threshold, line = teachers.check_threshold(readings, truth, "keep", {4}, set("ab12"))
    assert threshold == pytest.approx(0.91)
    assert "10 of 20 read right" in line and "threshold is applied" in line
    unranked = [TeacherReading(r.path, r.text, None, 0.5) for r in readings]  # confidence tells nothing
    threshold, line = teachers.check_threshold(unranked, truth, "keep", {4}, set("ab12"))
    assert threshold is None and "no confidence filter" in line


# ----------------------------------------------------------------------------- ddddocr, optional


def test_a_missing_ddddocr_is_named_in_one_line_with_its_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ddddocr", None)  # import ddddocr now raises ImportError
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    shutil.copy(READER_IMAGES[0], folder / "0001.png")
    assert train.main(["--unlabeled", str(folder), "--teacher", "ddddocr", "--out", str(tmp_path / "run")]) == 2
    assert read_captchas.main(["--model", "ddddocr", "--image", str(READER_IMAGES[0])]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["error: --teacher ddddocr needs the ddddocr package: pip install ddddocr"] * 2


def test_test_py_reads_and_scores_a_folder_with_ddddocr(tmp_path, capsys):
    """The real package (.ci/run installs it): what the teacher reads on a site, before any training."""
    pytest.importorskip("ddddocr", reason="ddddocr is optional; .ci/run installs requirements-teacher.txt")
    assert read_captchas.main(["--model", "ddddocr", "--folder", str(READER_IMAGES[0].parent),
                               "--output", str(tmp_path / "readings.json")]) == 0
    printed = capsys.readouterr()
    assert f"{len(READER_IMAGES)} labelled images: exact match" in printed.out
    readings = json.loads((tmp_path / "readings.json").read_text())["readings"]
    assert [Path(r["path"]).name for r in readings] == [p.name for p in READER_IMAGES]
    right = [r["prediction"] == Path(r["path"]).stem for r in readings]
    assert np.mean(right) >= 0.5  # plain digits: the zero-shot reader reads most of them


def test_a_teacher_without_unlabelled_images_is_refused(tmp_path, capsys):
    assert train.main(["--teacher", "ddddocr", "--out", str(tmp_path / "run")]) == 2
    assert "--unlabeled" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a student above its teacher


def degraded_copy(path, scale, seed=0):
    """The fixture reader with noise on its output layer: a teacher that reads the fixture look partly right."""
    crnn, meta = model.load_model(READER)
    output = crnn.layers[-1]
    weights = [w.copy() for w in output.get_weights()]
    weights[0] += np.random.default_rng(seed).normal(0, scale * weights[0].std(), weights[0].shape)
    output.set_weights(weights)
    model.save_model(crnn, path, meta)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A check folder of 60 labelled images, 120 unlabelled ones under numbers (their truth kept aside) plus a copy
    of a check image, and a stand-in teacher that reads the look partly right."""
    root = tmp_path_factory.mktemp("site")
    check, unlabelled, truth = labelled_and_unlabelled(root, "check", "copy_of_a_check_image.png")
    return check, unlabelled, truth, degraded_copy(root / "teacher.keras", scale=3.0)


def exact_match(model_path, paths):
    return np.mean([Path(r.path).stem == r.text for r in reader.Reader(model_path).read_paths(list(paths))])


def test_a_student_of_a_stand_in_teacher_is_chosen_and_scored_on_the_check_folder_only(site, tmp_path, capsys):
    check, unlabelled, truth, teacher_model = site
    out = tmp_path / "run"
    assert train.main(["--unlabeled", str(unlabelled), "--teacher", str(teacher_model), "--check", str(check),
                       "--init_from", str(teacher_model), "--epochs", "2", "--rounds", "1", "--workers", "1",
                       "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "teacher on the check folder:" in printed
    results = json.loads((out / "metrics.json").read_text())
    assert all(Path(r["path"]).parent == check for r in results["readings"] + results["val_readings"])
    with open(selftrain.pseudo_labels_path(out, 0)) as f:
        round_zero = list(csv.DictReader(f))
    assert round_zero and all(Path(row["path"]).parent == unlabelled for row in round_zero)
    right = [truth.get(Path(row["path"]).name) == row["label"] for row in round_zero]
    # the confidence threshold chosen on the check folder keeps the teacher's better readings
    assert np.mean(right) > exact_match(teacher_model, sorted(unlabelled.glob("0*.png")))
    labelled_copy = str(unlabelled / "copy_of_a_check_image.png")
    for number in (0, 1):  # where a round's pseudo-labels take the copy of a check image, train.py leaves it out
        if labelled_copy in dict(selftrain.read_pseudo_labels(selftrain.pseudo_labels_path(out, number))):
            assert "1 unlabelled files are copies of labelled images: left out" in printed
    assert modelmeta.read_meta(out / runstate.BEST_NAME)["abstain"]["target_precision"] == 0.99


def with_a_new_look(folder, seed):
    """Blurred, with a line across each: a look the fixture reader never saw, so it reads the images partly right."""
    import cv2

    rng = np.random.default_rng(seed)
    for path in sorted(folder.iterdir()):
        image = cv2.GaussianBlur(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (3, 3), 0)
        start, end = rng.integers(0, (160, 48), 2), rng.integers(0, (160, 48), 2)
        cv2.line(image, tuple(map(int, start)), tuple(map(int, end)), int(rng.integers(0, 80)), 2)
        cv2.imwrite(str(path), image)


def test_a_student_reads_a_new_look_far_better_than_its_teacher(tmp_path):
    """The teacher is a model of a similar site (the fixture reader); the site's captchas have a look it never
    saw. From its confident readings alone, and 60 checked images, the student learns the new look."""
    for name, count, seed in (("check", 60, 21), ("drawn", 400, 22), ("test", 200, 23)):
        draw_folder(tmp_path / name, count, seed=seed)
        with_a_new_look(tmp_path / name, seed)
    unlabelled = tmp_path / "unlabelled"
    as_unlabelled(tmp_path / "drawn", unlabelled)
    out = tmp_path / "run"
    assert train.main(["--unlabeled", str(unlabelled), "--teacher", str(READER), "--check", str(tmp_path / "check"),
                       "--init_from", str(READER), "--epochs", "10", "--rounds", "1", "--workers", "1",
                       "--out", str(out)]) == 0
    test_images = sorted((tmp_path / "test").iterdir())  # drawn apart: neither the check nor the unlabelled ones
    teacher_reads, student_reads = exact_match(READER, test_images), exact_match(out / runstate.BEST_NAME, test_images)
    assert teacher_reads < 0.8 and student_reads > teacher_reads + 0.05, (teacher_reads, student_reads)


def test_with_no_check_folder_the_run_says_it_cannot_measure_itself_and_resumes_in_its_round(site, tmp_path,
                                                                                             monkeypatch, capsys):
    check, unlabelled, truth, teacher_model = site
    out = tmp_path / "run"
    flags = ["--unlabeled", str(unlabelled), "--teacher", str(teacher_model), "--init_from", str(teacher_model),
             "--epochs", "2", "--rounds", "1", "--workers", "1", "--out", str(out)]
    run_stopped_while_round_one_is_scored(monkeypatch, flags)
    printed = capsys.readouterr().out
    assert "the run cannot measure itself" in printed
    taught = (out / selftrain.TEACHER_READINGS_NAME).stat().st_mtime_ns
    with open(out / selftrain.TEACHER_CHECK_NAME) as f:
        held_out = {row["file"] for row in csv.DictReader(f)}
    assert len(held_out) >= selftrain.MIN_TEACHER_CHECK
    with open(selftrain.pseudo_labels_path(out, 0)) as f:
        assert not held_out & {Path(row["path"]).name for row in csv.DictReader(f)}  # the teacher's check: no training
    with open(selftrain.pseudo_labels_path(out, 1)) as f:  # the student reads every image, held-out ones too
        relabelled_held_out = held_out & {Path(row["path"]).name for row in csv.DictReader(f)}

    assert train.main(["--resume", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "self-training round 1: resumed" in printed
    if relabelled_held_out:  # ... and train.py leaves them out of round 1's training split
        assert f"({len(relabelled_held_out)} unlabelled files are copies of labelled images: left out)" in printed
    assert (out / selftrain.TEACHER_READINGS_NAME).stat().st_mtime_ns == taught  # the teacher did not read again
    results = json.loads((out / "metrics.json").read_text())
    assert "agreement with the teacher" in results["scored_on"]
    assert all(Path(r["path"]).name in held_out for r in results["readings"])
    assert modelmeta.read_meta(out / runstate.BEST_NAME)["abstain"] is None
    assert "no confidence threshold stored" in reader.Reader(out / runstate.BEST_NAME).low_confidence_rule().description

