"""Issue: Gregwar-style data, fine-tuning from a trained model, and the recipe benchmark."""

import json

import keras
import numpy as np
import pytest
from PIL import Image

from tools import bench
import dataset
import labels as label_sources
import model
import preprocess
import runstate
import synth
import train
from conftest import DIGITS, stop_after_epoch


@pytest.mark.parametrize("style, size, extension", [("captcha", (200, 50), ".png"), ("gregwar", (150, 40), ".jpg"),
                                                    ("hershey", (160, 60), ".png")])
def test_every_synthetic_style_is_deterministic_labelled_and_sized(tmp_path, style, size, extension):
    a = synth.generate_synthetic(tmp_path / "a", 10, seed=11, style=style, workers=1, progress=False)
    b = synth.generate_synthetic(tmp_path / "b", 10, seed=11, style=style, workers=2, progress=False)
    c = synth.generate_synthetic(tmp_path / "c", 10, seed=12, style=style, workers=1, progress=False)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    for path in a:
        assert path.suffix == extension
        with Image.open(path) as image:
            assert image.size == size
        label = label_sources.label_from_filename(path)
        assert len(label) == 5 and not preprocess.Charset().unknown_symbols(label)


def test_visible_fractions_count_the_ink_that_later_symbols_cover():
    square = np.ones((10, 10))
    # drawn in order: a, then b over a's right half, then c exactly over b
    assert synth.visible_fractions([(square, 0, 0), (square, 0, 5), (square, 0, 5)], 30, 10) == [0.5, 0.0, 1.0]
    assert synth.visible_fractions([(square, 0, 0), (square * 0.2, 0, 0)], 30, 10) == [1.0, 1.0]  # faint: not ink


def test_synth_visibility_lists_the_files_it_would_draw(tmp_path, capsys):
    drawn = synth.generate_synthetic(tmp_path / "set", 8, seed=21, style="hershey", workers=1, progress=False)
    csv_path = tmp_path / "visibility.csv"
    assert synth.main(["--style", "hershey", "--count", "8", "--seed", "21", "--visibility", str(csv_path)]) == 0
    rows = [line.split(",") for line in csv_path.read_text().splitlines()[1:]]
    assert [name for name, _, _ in rows] == [p.name for p in drawn]
    jobs = synth.plan_synthetic(8, 21, preprocess.DEFAULT_SYMBOLS, 5, 160, 60)
    for (_, label, least), (text, image_seed, width, height) in zip(rows, jobs):
        fractions = synth.hershey_visibility(text, image_seed, width, height)
        assert label == text and len(fractions) == 5 and float(least) == pytest.approx(min(fractions), abs=1e-3)
        assert all(0.0 <= f <= 1.0 for f in fractions) and fractions[-1] == 1.0  # nothing is drawn over the last
    # the placements are where the picture has its ink (dark, 0-120, on a light background)
    gray = np.asarray(Image.open(drawn[0]).convert("L"), np.float32)
    ink = np.zeros(gray.shape, bool)
    for alpha, top, left in synth.hershey_placements(*jobs[0]):
        ink[top : top + alpha.shape[0], left : left + alpha.shape[1]] |= alpha > 0.9
    assert gray[ink].mean() < gray[~ink].mean() - 90  # 110 here; 38 with placements drawn from a misaligned rng
    assert synth.main(["--style", "captcha", "--visibility", str(csv_path)]) == 2
    assert "hershey only" in capsys.readouterr().err


def test_gregwar_style_varies_like_the_library(tmp_path):
    paths = synth.generate_synthetic(tmp_path, 40, seed=3, style="gregwar", workers=1, progress=False)
    borders = [np.median(np.concatenate([g[0], g[-1]])) for g in map(preprocess.read_gray, paths)]
    inverted = sum(level < 128 for level in borders)
    assert 8 <= inverted <= 32  # about half the images are colour-inverted
    assert len(synth.gregwar_fonts()) == 6 and all(map(lambda f: __import__("os").path.exists(f),
                                                            synth.gregwar_fonts()))


def cnn_weights(crnn):
    return [w.numpy() for layer in crnn.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization))
            for w in layer.weights]


def test_frozen_convolutions_stay_fixed_through_a_resume_then_learn(trained_run, digits_folder, tmp_path,
                                                                    monkeypatch, capsys):
    """--freeze_cnn_epochs 2 --epochs 3, stopped after epochs 1 and 2 and resumed each time: the convolutions
    (BatchNorm statistics included) keep the source's weights for two epochs, the optimizer state
    survives the resume inside the frozen phase, and the convolutions learn in epoch 3."""
    source = trained_run / runstate.BEST_NAME
    out = tmp_path / "tuned"
    stop_after_epoch(monkeypatch, 1)
    code = train.main(["--data_dir", str(digits_folder), "--init_from", str(source), "--freeze_cnn_epochs", "2",
                       "--epochs", "3", "--batch_size", "8", "--workers", "1", "--charset", "digits",
                       "--out", str(out)])
    assert code == 130
    printed = capsys.readouterr().out
    assert f"starting from {source} (every symbol's output row carried over)" in printed and "convolutions frozen" in printed
    steps_per_epoch = 4  # 32 training images, batch 8
    before, _ = model.load_model(source)
    after_1, _ = model.load_model(out / runstate.RESUME_NAME, compile=True)
    assert int(after_1.optimizer.iterations.numpy()) == steps_per_epoch

    stop_after_epoch(monkeypatch, 2)
    assert train.main(["--resume", "--out", str(out)]) == 130
    after_2, _ = model.load_model(out / runstate.RESUME_NAME, compile=True)
    assert int(after_2.optimizer.iterations.numpy()) == 2 * steps_per_epoch  # went on counting: state kept
    assert all(np.array_equal(x, y) for x, y in zip(cnn_weights(before), cnn_weights(after_2)))  # frozen
    lstm = lambda m: m.get_layer("bilstm_1").get_weights()[0]  # noqa: E731
    assert not np.array_equal(lstm(after_1), lstm(after_2))  # while the rest learned

    monkeypatch.undo()
    assert train.main(["--resume", "--out", str(out)]) == 0
    final, _ = model.load_model(out / runstate.FINAL_NAME)
    assert not all(np.array_equal(x, y) for x, y in zip(cnn_weights(before), cnn_weights(final)))  # thawed


def test_fine_tuning_to_another_charset_keeps_the_shared_symbols(trained_run, tmp_path, capsys):
    data = tmp_path / "hex"
    synth.generate_synthetic(data, 30, seed=4, symbols="0123456789abcdef", length=4, workers=1, progress=False)
    out = tmp_path / "tuned"
    assert train.main(["--data_dir", str(data), "--init_from", str(trained_run / runstate.BEST_NAME), "--epochs", "1",
                       "--charset", "0123456789abcdef", "--batch_size", "8", "--workers", "1",
                       "--out", str(out)]) == 0
    assert "output rows for new symbols start untrained: abcdef" in capsys.readouterr().out
    tuned, meta = model.load_model(out / runstate.FINAL_NAME)
    assert tuned.output_shape == (None, 50, 17) and meta["charset"]["symbols"] == "0123456789abcdef"


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


def test_another_kind_of_captcha_trains_with_the_defaults(tmp_path):
    """Lower-case letters and digits, 4 to 6 characters, 150x40 JPEGs: charset and length come from the data."""
    data = tmp_path / "other"
    synth.generate_synthetic(data, 40, seed=9, symbols="abcdefghijklmnopqrstuvwxyz0123456789", length=(4, 6),
                                  style="gregwar", workers=1, progress=False)
    labels = [label_sources.label_from_filename(p) for p in preprocess.list_images(data)]
    out = tmp_path / "out"
    assert train.main(["--data_dir", str(data), "--preset", "tiny", "--epochs", "1", "--workers", "1",
                       "--out", str(out)]) == 0
    _, meta = model.load_model(out / runstate.BEST_NAME)
    assert meta["max_len"] == max(map(len, labels)) == 6
    assert set(meta["charset"]["symbols"]) == set("".join(labels)) and meta["charset"]["blank_index"] == 0


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
    assert meta["charset"]["symbols"] == preprocess.charset_of_labels([label for _, label in samples]).symbols
    assert (meta["preprocess"]["resize"], meta["preprocess"]["clahe_clip"]) == ("stretch", 0)  # keras-io's pixels


def test_bench_names_a_missing_start_model_in_one_line(digits_folder, tmp_path, capsys):
    missing = tmp_path / "nope.keras"
    assert bench.main(["--data_dir", str(digits_folder), "--runs", f"x=tiny:default+{missing}", "--out",
                       str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{missing}: no such model file to start from" in error
