"""synth.py: the synthetic styles, seeded, labelled and sized; its command."""


import numpy as np
import pytest
from PIL import Image

import label_sources
import charsets
import imagefiles
import preprocess
import synth
from conftest import run_script
from charsets import Charset


@pytest.mark.parametrize("style, size, extension", [("captcha", (200, 50), ".png"), ("gregwar", (150, 40), ".jpg"),
                                                    ("hershey", (160, 60), ".png")])
def test_every_synthetic_style_is_deterministic_labelled_and_sized(tmp_path, style, size, extension):
    a = synth.generate_synthetic(tmp_path / "a", 10, synth.Drawing(style=style), seed=11, workers=1, progress=False)
    b = synth.generate_synthetic(tmp_path / "b", 10, synth.Drawing(style=style), seed=11, workers=2, progress=False)
    c = synth.generate_synthetic(tmp_path / "c", 10, synth.Drawing(style=style), seed=12, workers=1, progress=False)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    for path in a:
        assert path.suffix == extension
        with Image.open(path) as image:
            assert image.size == size
        label = label_sources.label_from_filename(path)
        assert len(label) == 5 and not charsets.Charset().unknown_symbols(label)


def test_visible_fractions_count_the_ink_that_later_symbols_cover():
    square = np.ones((10, 10))
    # drawn in order: a, then b over a's right half, then c exactly over b
    assert synth.visible_fractions([(square, 0, 0), (square, 0, 5), (square, 0, 5)], 30, 10) == [0.5, 0.0, 1.0]
    assert synth.visible_fractions([(square, 0, 0), (square * 0.2, 0, 0)], 30, 10) == [1.0, 1.0]  # faint: not ink


def test_synth_visibility_lists_the_files_it_would_draw(tmp_path, capsys):
    drawn = synth.generate_synthetic(tmp_path / "set", 8, synth.Drawing(style="hershey"), seed=21, workers=1, progress=False)
    csv_path = tmp_path / "visibility.csv"
    assert synth.main(["--style", "hershey", "--count", "8", "--seed", "21", "--visibility", str(csv_path)]) == 0
    rows = [line.split(",") for line in csv_path.read_text().splitlines()[1:]]
    assert [name for name, _, _ in rows] == [p.name for p in drawn]
    jobs = synth.plan_synthetic(8, 21, charsets.DEFAULT_SYMBOLS, 5, 160, 60)
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
    paths = synth.generate_synthetic(tmp_path, 40, synth.Drawing(style="gregwar"), seed=3, workers=1, progress=False)
    borders = [np.median(np.concatenate([g[0], g[-1]])) for g in map(preprocess.read_gray, paths)]
    inverted = sum(level < 128 for level in borders)
    assert 8 <= inverted <= 32  # about half the images are colour-inverted
    assert len(synth.gregwar_fonts()) == 6 and all(map(lambda f: __import__("os").path.exists(f),
                                                            synth.gregwar_fonts()))


def test_synth_command_writes_a_labelled_folder(tmp_path):
    result = run_script("synth.py", "--out", tmp_path / "s", "--count", "6", "--seed", "3",
                        "--charset", "lower_digits", "--length", "4-6", "--workers", "1")
    assert result.returncode == 0, result.stderr
    labels = [label_sources.label_from_filename(p) for p in imagefiles.list_images(tmp_path / "s")]
    assert len(labels) == 6 and all(4 <= len(label) <= 6 for label in labels)
    assert not Charset(charsets.CHARSET_PRESETS["lower_digits"]).unknown_symbols("".join(labels))


def test_synthetic_generator_is_deterministic_and_labels_files(tmp_path):
    a = synth.generate_synthetic(tmp_path / "a", 12, seed=5, workers=1, progress=False)
    b = synth.generate_synthetic(tmp_path / "b", 12, seed=5, workers=2, progress=False)
    c = synth.generate_synthetic(tmp_path / "c", 12, seed=6, workers=1, progress=False)
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert [p.name for p in a] != [p.name for p in c]
    for path in a:
        label = label_sources.label_from_filename(path)
        assert len(label) == 5 and not Charset().unknown_symbols(label)
        assert preprocess.read_gray(path).shape == (50, 200)


def test_unique_filename_avoids_case_blind_collisions():
    taken = set()
    assert synth.unique_filename("aB3xQ", taken) == "aB3xQ.png"
    assert synth.unique_filename("Ab3xq", taken) == "Ab3xq_1.png"  # one file with aB3xQ.png on macOS
    assert synth.unique_filename("AB3XQ", taken) == "AB3XQ_2.png"
    assert synth.unique_filename("zZ9", taken) == "zZ9.png"
    assert label_sources.label_from_filename("AB3XQ_2.png") == "AB3XQ"
