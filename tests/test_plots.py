"""plots.py: pictures of a run (curves, predictions, confusions, augmentation), drawn again by its command."""

import json
from pathlib import Path

import numpy as np

import synth
from conftest import cjk_font_needed


def test_augmentation_picture_shows_the_loaders_own_output(tmp_path):
    import plots

    image = synth.generate_synthetic(tmp_path / "img", 1, seed=2, workers=1, progress=False)[0]
    plain = tmp_path / "plain.png"
    assert plots.main(["--augmentation", str(plain), str(image)]) == 0
    from PIL import Image

    with Image.open(plain) as picture:
        pixels = np.asarray(picture.convert("L"), dtype=np.float32)
    columns = np.array_split(pixels, 7, axis=1)  # as read, 3 x light, 3 x strong
    assert all(np.abs(columns[0] - column).mean() > 1.0 for column in columns[1:])  # every epoch's panel differs


def test_training_plots_are_real_pictures_of_this_run(trained_run):
    from PIL import Image

    import plots

    for name in ["training_curves.png", "predictions.png", "confusions.png"]:
        with Image.open(trained_run / name) as picture:
            assert picture.format == "PNG" and picture.width > 300 and picture.height > 100
    rows = plots.read_log(trained_run / "train_log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # the curves' data is this run's own history
    examples = json.loads((trained_run / "metrics.json").read_text())["examples"]
    truths, predictions = [e["truth"] for e in examples], [e["prediction"] for e in examples]
    assert sum(n for _, n in plots.confusions(truths, predictions, top=100)) <= sum(len(t) for t in truths)


def test_plots_command_redraws_a_finished_run(trained_run, tmp_path):
    import shutil

    import plots

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"]["batch_size"] = 0  # as a run that took the recipe's batch size records it
    (run / "metrics.json").write_text(json.dumps(metrics))
    for name in ["training_curves.png", "predictions.png", "confusions.png"]:
        (run / name).unlink()
    assert plots.main([str(run)]) == 0
    for name in ["training_curves.png", "predictions.png", "confusions.png"]:
        assert (run / name).stat().st_size > 1000
    assert plots.main([str(tmp_path / "nothing")]) == 2


def test_plots_command_draws_the_runs_own_readings(trained_run, digits_folder, tmp_path, capsys):
    """plots.py RUN draws what the run wrote (its test readings, its checkpoint's preprocessing), not a rescan."""
    import shutil

    import plots

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(digits_folder, data)
    shutil.copytree(trained_run, run)
    results = json.loads((run / "metrics.json").read_text())
    for reading in results["readings"]:
        reading["path"] = str(data / Path(reading["path"]).name)
    (run / "metrics.json").write_text(json.dumps(results))
    assert plots.main([str(run)]) == 0
    drawn = (run / "predictions.png").read_bytes()
    results["readings"][0]["prediction"] += "9"  # another reading of the first test image
    (run / "metrics.json").write_text(json.dumps(results))
    assert plots.main([str(run)]) == 0
    assert (run / "predictions.png").read_bytes() != drawn  # the picture follows the run's readings
    gone = Path(results["readings"][0]["path"])
    gone.unlink()
    assert plots.main([str(run)]) == 2
    assert f"{gone}: cannot read file" in capsys.readouterr().err


def test_confusions_count_substitutions_only():
    import plots

    assert plots.confusions(["abcde", "abcde", "xyz"], ["abXde", "abXd", "xyz"]) == [(("c", "X"), 2)]


@cjk_font_needed
def test_a_runs_plots_draw_hanzi_with_the_installed_cjk_font(tmp_path):
    import warnings

    import plots

    log = tmp_path / "train_log.csv"
    log.write_text("epoch,loss,val_loss,val_exact_match,val_cer\n0,1.0,1.2,0.5,0.1\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = plots.write_run_plots(tmp_path, log, np.zeros((2, 50, 200, 1)), ["降飞淀惶", "山水火木"],
                                        ["降飞淀惶", "山水火水"])
    assert all(path.is_file() for path in written)
    assert not [w for w in caught if "missing from font" in str(w.message)]
