"""selftrain.py: pseudo-labels (confident, of a typed length, never a rejected reading, never a copy of a labelled
image) and rounds that resume where they stopped."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from make_reader import draw_folder  # the fixture reader's own look

import label_sources
import model
import modelmeta
import runstate
import selftrain
import train
from conftest import (
    READER,
    READER_IMAGES,
    labelled_and_unlabelled,
    run_stopped_while_round_one_is_scored,
)


def write_round(out, number, wrong, count=20):
    """A self-training round's metrics.json whose best model misreads the first `wrong` of `count` validation images."""
    folder = selftrain.round_dir(out, number)
    folder.mkdir(parents=True)
    readings = [{"path": f"val/{i:02d}.png", "truth": "abcde", "prediction": "abcdx" if i < wrong else "abcde"}
                for i in range(count)]
    (folder / "metrics.json").write_text(json.dumps({"val_readings": readings}))
    return {"round": number, "val_cer": wrong / (5 * count)}


def test_self_training_keeps_the_last_round_unless_an_earlier_one_reads_validation_better_beyond_chance(tmp_path):
    # round 0 read all 20 validation images, round 1 missed one: noise, so round 1 (more training data) is kept
    summaries = [write_round(tmp_path / "a", 0, wrong=0), write_round(tmp_path / "a", 1, wrong=1)]
    assert selftrain.choose_round(tmp_path / "a", summaries)[0]["round"] == 1
    # round 1 misses 6 that round 0 reads: beyond chance, round 0 is kept
    summaries = [write_round(tmp_path / "b", 0, wrong=0), write_round(tmp_path / "b", 1, wrong=6),
                 write_round(tmp_path / "b", 2, wrong=7)]
    chosen, why = selftrain.choose_round(tmp_path / "b", summaries)
    assert chosen["round"] == 0 and "beyond chance" in why


def test_pseudo_labelled_copies_of_labelled_images_are_left_out(tmp_path):
    draw_folder(tmp_path / "labelled", 4, seed=3)
    labelled = [(path, path.stem) for path in sorted((tmp_path / "labelled").iterdir())]
    (tmp_path / "unlabelled").mkdir()
    shutil.copy(labelled[0][0], tmp_path / "unlabelled" / "copy.png")
    draw_folder(tmp_path / "other", 2, seed=4)
    others = [(path, path.stem) for path in sorted((tmp_path / "other").iterdir())]
    pseudo = [(tmp_path / "unlabelled" / "copy.png", "1"), *others]
    kept, copies = selftrain.without_labelled_copies(pseudo, labelled)
    assert copies == 1 and kept == pseudo[1:]


def test_readings_of_a_length_no_typed_label_has_are_no_pseudo_labels(tmp_path):
    lengths = {len(path.stem) for path in READER_IMAGES}
    assert lengths == {3, 4}  # the fixture images: both lengths, each read right by the reader
    path = tmp_path / "reader.keras"
    shutil.copy(READER, path)
    for typed, kept_lengths in (([4, 4], {4}), ([3, 4], {3, 4})):
        model.update_meta(path, {"label_lengths": typed})
        found = selftrain.pseudo_label(path, READER_IMAGES)
        assert [(Path(p).name, text) for p, text, _ in found.kept] == [
            (image.name, image.stem) for image in READER_IMAGES if len(image.stem) in kept_lengths]
        assert found.unreadable == 0 and found.wrong_length == len(READER_IMAGES) - len(found.kept)
        assert found.known_wrong == 0 and found.unsteady == 0


def test_readings_the_site_rejected_are_no_pseudo_labels(tmp_path):
    """serve.py --collect files a rejected reading in rejected/readings.csv; self-training on that folder never
    takes the same reading as a pseudo-label (another reading of the image may still be one)."""
    folder = tmp_path / "rejected"
    folder.mkdir()
    for image in READER_IMAGES:
        shutil.copy(image, folder / image.name)
    first, second = READER_IMAGES[0], READER_IMAGES[1]
    with open(folder / label_sources.REJECTED_READINGS_NAME, "w", encoding="utf-8") as f:
        f.write(f"{first.name},{first.stem}\n{second.name},{second.stem[::-1]}x\n")  # the reader's reading; another
    assert label_sources.rejected_readings(folder) == {first.name: first.stem, second.name: second.stem[::-1] + "x"}
    paths = [folder / image.name for image in READER_IMAGES]
    found = selftrain.pseudo_label(READER, paths, rejected=label_sources.rejected_readings(folder))
    assert found.known_wrong == 1 and first.name not in {Path(p).name for p, _, _ in found.kept}
    assert second.name in {Path(p).name for p, _, _ in found.kept}
    assert label_sources.rejected_readings(tmp_path) == {}  # no readings file: nothing rejected


def test_readings_an_augmented_copy_reads_otherwise_are_no_pseudo_labels(monkeypatch):
    every = selftrain.pseudo_label(READER, READER_IMAGES)
    assert len(every.kept) == len(READER_IMAGES)  # the reader reads its fixture images right
    # the light augmentation, seeded per image: the same copies whatever the order
    steady = selftrain.pseudo_label(READER, READER_IMAGES, augmented_copies=2, seed=5)
    assert steady == selftrain.pseudo_label(READER, READER_IMAGES, augmented_copies=2, seed=5)
    backwards = selftrain.pseudo_label(READER, READER_IMAGES[::-1], augmented_copies=2, seed=5)
    assert sorted(backwards.kept) == sorted(steady.kept)
    assert steady.unsteady == len(every.kept) - len(steady.kept) and set(steady.kept) <= set(every.kept)
    # copies of two images blanked: their readings change, so they are left out, and only they
    blanked = {READER_IMAGES[0].name, READER_IMAGES[3].name}
    monkeypatch.setattr(selftrain, "augmentation_for", lambda seed, copy: lambda path: (
        (lambda canvas: np.full_like(canvas, 255)) if Path(path).name in blanked else (lambda canvas: canvas)))
    found = selftrain.pseudo_label(READER, READER_IMAGES, augmented_copies=1)
    assert found.unsteady == 2 and {Path(p).name for p, _, _ in found.kept} == {
        image.name for image in READER_IMAGES} - blanked


def test_rounds_go_on_while_the_pseudo_labels_change():
    before = [("a.png", "12"), ("b.png", "34"), ("c.png", "56")]
    assert selftrain.changed_pseudo_labels(before, before) == 0
    assert selftrain.changed_pseudo_labels(before, before[:2]) == 1  # c.png no longer labelled: trained without
    assert selftrain.changed_pseudo_labels(before, [("a.png", "12"), ("b.png", "84"), ("d.png", "7")]) == 3
    assert selftrain.changed_pseudo_labels([], before) == 3
    assert selftrain.changed_pseudo_labels([(Path("a.png"), "12")], [("a.png", "12")]) == 0  # paths as str or Path


@pytest.fixture(scope="module")
def few_and_unlabelled(tmp_path_factory):
    """60 labelled images of the fixture reader's look, and 120 more under numbers, with their truth; one of
    them a copy of a labelled image."""
    return labelled_and_unlabelled(tmp_path_factory.mktemp("few"), "labelled", "copy.png")


def test_self_training_adds_confident_readings_to_training_only_and_resumes_in_its_round(few_and_unlabelled,
                                                                                         tmp_path, monkeypatch, capsys):
    labelled, unlabelled, truth = few_and_unlabelled
    out = tmp_path / "run"
    flags = ["--data_dir", str(labelled), "--unlabeled", str(unlabelled), "--init_from", str(READER), "--epochs", "2",
             "--rounds", "1", "--workers", "1", "--out", str(out)]
    calls = run_stopped_while_round_one_is_scored(monkeypatch, flags)
    printed = capsys.readouterr().out
    assert f"python train.py --resume --out {out}\n" in printed and "Traceback" not in printed
    assert calls == [out / "round_0", out / "round_1"]
    # round 1 builds on round 0: it starts from round 0's model, every symbol's output row carried over
    assert "self-training round 1: started" in printed and "it starts from round 0's model" in printed
    assert f"starting from {out / 'round_0' / runstate.BEST_NAME} (every symbol's output row carried over)" in printed
    assert (modelmeta.read_meta(out / "round_1" / runstate.RESUME_NAME)["charset"]
            == modelmeta.read_meta(out / "round_0" / runstate.BEST_NAME)["charset"])
    round_zero = (out / "round_0" / "metrics.json").stat().st_mtime_ns
    typed = [len(path.stem) for path in labelled.iterdir()]
    assert modelmeta.read_meta(out / "round_0" / runstate.BEST_NAME)["label_lengths"] == [min(typed), max(typed)]
    with open(selftrain.pseudo_labels_path(out, 1)) as f:
        pseudo = list(csv.DictReader(f))
    right = [truth.get(row["path"].rsplit("/", 1)[-1]) == row["label"] for row in pseudo]
    assert len(pseudo) >= 60 and np.mean(right) >= 0.95  # the reader reads its look well: most, and right
    assert all(row["path"].startswith(str(unlabelled)) for row in pseudo)
    assert float(min(row["confidence"] for row in pseudo)) >= modelmeta.read_meta(
        out / "round_0" / runstate.BEST_NAME)["abstain"]["threshold"]

    assert train.main(["--resume", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "self-training round 1: resumed" in printed and "round 0: resumed" not in printed
    assert "copies of labelled images: left out" in printed
    assert (out / "round_0" / "metrics.json").stat().st_mtime_ns == round_zero  # round 0 was not run again
    results = json.loads((out / "metrics.json").read_text())
    rounds = results["self_training"]["rounds"]
    assert [r["pseudo_labels"] for r in rounds] == [0, len(pseudo)]
    for summary in rounds:  # each round as its kept model reads validation, not its log's lowest-CER epoch
        val = json.loads((out / f"round_{summary['round']}" / "metrics.json").read_text())["val_readings"]
        assert summary["val_exact_match"] == np.mean([r["truth"] == r["prediction"] for r in val])
    tests = [json.loads((out / f"round_{n}" / "metrics.json").read_text())["readings"] for n in (0, 1)]
    assert [r["path"] for r in tests[0]] == [r["path"] for r in tests[1]]  # the same labelled test split
    assert all(r["path"].startswith(str(labelled)) for r in tests[1])
    chosen = out / f"round_{results['self_training']['chosen_round']}"
    assert (out / runstate.BEST_NAME).read_bytes() == (chosen / runstate.BEST_NAME).read_bytes()
    assert not (out / "round_1" / runstate.RESUME_NAME).exists()

    round_one = (out / "round_1" / "metrics.json").stat().st_mtime_ns
    # the finished run, a round more, its pseudo-labels filtered by agreement over augmented copies
    assert train.main(["--resume", "--out", str(out), "--rounds", "2", "--augmented_agreement", "2"]) == 0
    printed = capsys.readouterr().out
    assert "--rounds 2 over the run's 1" in printed and "--augmented_agreement 2 over the run's 0" in printed
    assert (out / "round_0" / "metrics.json").stat().st_mtime_ns == round_zero
    assert (out / "round_1" / "metrics.json").stat().st_mtime_ns == round_one
    assert selftrain.pseudo_labels_path(out, 2).exists()  # round 1's model read the unlabelled images
    assert "self-training round 2: started" in printed or "self-training ends: round 2's" in printed
    saved = json.loads((out / selftrain.STATE_NAME).read_text())["config"]
    assert saved["rounds"] == 2 and saved["augmented_agreement"] == 2  # a later --resume too
    assert train.main(["--resume", "--out", str(out), "--rounds", "-1"]) == 2  # refused in one line, nothing saved
    assert "--rounds -1: at least 1 round" in capsys.readouterr().err
    assert json.loads((out / selftrain.STATE_NAME).read_text())["config"]["rounds"] == 2
