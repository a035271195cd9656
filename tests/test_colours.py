"""The asked colour ("type the red characters"): the labels file's colour column, the colour planes of the input,
the channel rule that looks at the strokes, a tiny model that learns two colours and reads one image two ways
(test.py, an ONNX and a TFLite export, serve.py over HTTP), and the synthetic colours style."""

import base64
import json
import subprocess
import sys
import types

import cv2
import keras
import numpy as np
import pytest

import dataset
import export_safe
import finetune
import label_sources
import model
import preprocess
import reader
import synth
import teacher
import test as read_captchas
import train
from charsets import Charset
from conftest import READER, ROOT
from errors import CaptchaError
from test_serve import started_server
from tools.localhttp import call, multipart

INKS = {"red": (40, 40, 220), "blue": (220, 60, 40)}  # B, G, R


def bar_picture(shapes, colours):
    """Two slots of a 32x16 picture, each a shape (h: a lying bar, v: a standing one, o: a square) in an ink."""
    image = np.full((16, 32, 3), 245, np.uint8)
    for slot, (shape, colour) in enumerate(zip(shapes, colours)):
        x = 8 + 16 * slot
        corners, thickness = {"h": (((x - 6, 6), (x + 6, 9)), -1), "v": (((x - 2, 2), (x + 1, 13)), -1),
                              "o": (((x - 5, 3), (x + 4, 12)), 2)}[shape]
        cv2.rectangle(image, *corners, INKS[colour], thickness)
    return image


def two_colour_folder(folder, count, seed):
    """Captchas of two slots in red and blue; the label is the asked colour's shape (labels.csv: file,label,colour)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = ["file,label,colour"]
    for i in range(count):
        shapes = list(rng.choice(["h", "v", "o"], 2))
        colours = ["red", "blue"] if rng.random() < 0.5 else ["blue", "red"]
        asked = str(rng.choice(["red", "blue"]))
        cv2.imwrite(str(folder / f"{i:04d}.png"), bar_picture(shapes, colours))
        rows.append(f"{i:04d}.png,{shapes[colours.index(asked)]},{asked}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A tiny network trained on 256 two-colour captchas, checked on 64 others: (its --out, the check folder)."""
    root = tmp_path_factory.mktemp("colours")
    data, check = two_colour_folder(root / "data", 256, 0), two_colour_folder(root / "check", 64, 1)
    out = root / "out"
    assert train.main(["--data_dir", str(data), "--labels", str(data / "labels.csv"), "--check", str(check),
                       "--check_labels", str(check / "labels.csv"), "--preset", "tiny", "--init_from", "none",
                       "--height", "16", "--width", "32", "--epochs", "25", "--out", str(out)]) == 0
    return out, check


# ----------------------------------------------------------------------------- the labels file


def test_a_colour_column_gives_each_image_its_asked_colour(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((10, 10), 255, np.uint8))
    (tmp_path / "labels.tsv").write_text("file\tlabel\tColor\n0.png\tab\tRed \n1.png\tc\tblue\n2.png\td\t\n")
    found = label_sources.find_labels(tmp_path, labels_file=tmp_path / "labels.tsv")
    assert sorted(label for _, label in found.samples) == ["ab", "c"]
    assert found.asked == {str(tmp_path / "0.png"): "red", str(tmp_path / "1.png"): "blue"}
    assert found.skipped == {"no colour in the colour column": [str(tmp_path / "2.png")]}  # never read uncoloured
    assert "2 colours (blue, red)" in found.decision

    # an unlabelled folder's colours: the label column empty, the colours read all the same
    (tmp_path / "unlabelled.csv").write_text("file,label,colour\n0.png,,red\n1.png,,green\n")
    assert label_sources.asked_colours(tmp_path, tmp_path / "unlabelled.csv") == {
        str(tmp_path / "0.png"): "red", str(tmp_path / "1.png"): "green"}


def test_a_third_column_that_is_not_a_colour_is_said_not_read(tmp_path):
    cv2.imwrite(str(tmp_path / "0.png"), np.full((10, 10), 255, np.uint8))
    (tmp_path / "a.csv").write_text("0.png,ab,red\n")
    found = label_sources.find_labels(tmp_path, labels_file=tmp_path / "a.csv")
    assert found.asked == {} and "third column not read" in found.decision
    (tmp_path / "b.csv").write_text("file,label,source\n0.png,ab,site\n")
    found = label_sources.find_labels(tmp_path, labels_file=tmp_path / "b.csv")
    assert found.asked == {} and "column 'source' not read" in found.decision


# ----------------------------------------------------------------------------- the pixels


def test_the_asked_colour_is_one_plane_per_known_colour_and_unknown_ones_are_refused():
    options = preprocess.PreprocessOptions(preprocess.Canvas(16, 32, channels=3, colours=("blue", "red")))
    assert options.canvas.shape == (16, 32, 5)
    pixels = preprocess.preprocess_image(bar_picture("hv", ["red", "blue"]), options, asked="Red")
    assert pixels.shape == (16, 32, 5)
    assert (pixels[:, :, 3] == 0).all() and (pixels[:, :, 4] == 1).all()
    with pytest.raises(CaptchaError, match="unknown colour 'pink': this model knows blue, red"):
        preprocess.preprocess_image(bar_picture("hv", ["red", "blue"]), options, asked="pink")
    with pytest.raises(CaptchaError, match="give one of blue, red"):
        preprocess.preprocess_image(bar_picture("hv", ["red", "blue"]), options)
    with pytest.raises(CaptchaError, match="not trained with an asked colour"):
        preprocess.preprocess_image(np.full((16, 32), 255, np.uint8), preprocess.PreprocessOptions(), asked="red")
    stored = preprocess.PreprocessOptions.from_dict(json.loads(json.dumps(options.to_dict())))
    assert stored == options and "colours" not in preprocess.PreprocessOptions().to_dict()  # old readers read it


def test_thin_coloured_strokes_on_a_light_background_read_in_colour():
    """The 90th percentile of saturation calls a captcha gray when its coloured strokes are under a tenth of the
    pixels; the strokes' own chroma does not."""
    image = np.full((60, 200, 3), 250, np.uint8)
    for x in range(10, 190, 30):  # six thin coloured characters' worth of ink, about 5% of the pixels
        cv2.line(image, (x, 15), (x + 12, 45), (40, 40, 220) if x % 60 else (210, 80, 30), 2)
    assert float(np.percentile(cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 1], 90)) < dataset.COLOUR_SATURATION
    assert dataset.colour_saturation(image) >= dataset.COLOUR_SATURATION
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    jpeg = cv2.imdecode(cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 40])[1], cv2.IMREAD_COLOR)
    assert dataset.colour_saturation(jpeg) < dataset.COLOUR_SATURATION  # dark gray strokes with JPEG noise: gray


def test_a_start_model_carries_into_an_asked_colour_model_and_reads_as_before():
    """The gray base's first convolution widened to colour and a zero shift for each asked colour: every image reads
    exactly as the start model reads it, whatever colour is asked; the planes are not convolved (the first
    convolution takes the image's channels only)."""
    config = model.PRESETS["tiny"]
    gray = model.build_model(config, 5)
    target, _ = finetune.start_from(gray, {"charset": Charset("abcd").to_dict()}, Charset("abcd"), config,
                                    preprocess.PreprocessOptions(preprocess.Canvas(channels=3, colours=("blue", "red"))))
    first_conv = next(layer for layer in target.layers if isinstance(layer, keras.layers.Conv2D))
    assert first_conv.get_weights()[0].shape == (3, 3, 3, 8)
    image = np.random.default_rng(0).random((2, 50, 200, 1), dtype=np.float32)
    colour = np.repeat(image, 3, axis=3)
    for plane in (3, 4):
        asked = np.concatenate([colour, np.zeros((2, 50, 200, 2), np.float32)], axis=3)
        asked[..., plane] = 1.0
        np.testing.assert_allclose(target.predict_on_batch(asked), gray.predict_on_batch(image), atol=1e-5)


def test_asked_colours_are_carried_by_name_and_a_first_release_models_planes_are_left_out():
    """A start model's asked colours keep their shifts by name (a new one starts at zero). A first-release model
    convolved the planes with the image: its image channels are carried, its planes left out, its shifts zero."""
    config = model.PRESETS["tiny"]
    rng = np.random.default_rng(1)
    source = model.build_model(config, 5, preprocess.Canvas(channels=3, colours=("blue", "red")))
    for name in model.ASKED_COLOUR_LAYERS:  # the image's shift (2, 3), the column features' (2, F)
        layer = source.get_layer(name)
        layer.set_weights([rng.random(tuple(layer.weights[0].shape), dtype=np.float32)])
    colours = (("blue", "red"), ("green", "red", "blue"))
    target = model.build_model(config, 5, preprocess.Canvas(channels=3, colours=colours[1]))
    finetune.copy_weights_by_symbol(source, Charset("abcd"), target, Charset("abcd"), colours)
    for name in model.ASKED_COLOUR_LAYERS:
        carried, known = (m.get_layer(name).get_weights()[0] for m in (target, source))
        assert carried.shape == (3, known.shape[1])
        np.testing.assert_array_equal(carried[0], 0)  # green: new
        np.testing.assert_array_equal(carried[1], known[1])  # red, by name
        np.testing.assert_array_equal(carried[2], known[0])  # blue

    # the first release's layout: the colour image and the two planes all input channels of the first convolution
    first_release = model.build_model(config, 5, types.SimpleNamespace(shape=(50, 200, 5), colours=()))
    first_release.layers[1].set_weights([rng.random((3, 3, 5, 8), dtype=np.float32)])
    finetune.copy_weights_by_symbol(first_release, Charset("abcd"), target, Charset("abcd"), colours)
    for name in model.ASKED_COLOUR_LAYERS:
        np.testing.assert_array_equal(target.get_layer(name).get_weights()[0], 0)
    first_conv = next(layer for layer in target.layers if isinstance(layer, keras.layers.Conv2D))
    np.testing.assert_array_equal(first_conv.get_weights()[0], first_release.layers[1].get_weights()[0][:, :, :3])


# ----------------------------------------------------------------------------- a model that reads the asked colour


def test_a_model_learns_two_colours_and_reads_one_image_two_ways(colour_run, capsys):
    out, check = colour_run
    best = out / "crnn_ctc_best.keras"
    assert json.loads((out / "metrics.json").read_text())["test"]["exact_match"] >= 0.9
    assert read_captchas.main(["--model", str(best), "--folder", str(check), "--labels",
                               str(check / "labels.csv")]) == 0
    assert "64 labelled images: exact match 1.0000" in capsys.readouterr().out  # each with its own colour

    picture = check.parent / "one.png"
    cv2.imwrite(str(picture), bar_picture("hv", ["red", "blue"]))
    captcha_reader = reader.Reader.load(best)
    assert captcha_reader.colours == ("blue", "red")
    assert captcha_reader.read(picture, colour="red").text == "h"
    assert captcha_reader.read(picture.read_bytes(), colour="blue").text == "v"
    assert read_captchas.main(["--model", str(best), "--image", str(picture), "--colour", "BLUE"]) == 0
    assert capsys.readouterr().out.startswith(f"{picture} -> v ")

    assert read_captchas.main(["--model", str(best), "--image", str(picture), "--colour", "pink"]) == 2
    assert capsys.readouterr().err.strip() == f"error: unknown colour 'pink': {best} knows blue, red"
    assert read_captchas.main(["--model", str(best), "--image", str(picture)]) == 2
    assert "give --colour (one of blue, red)" in capsys.readouterr().err
    assert read_captchas.main(["--model", str(READER), "--image", str(picture), "--colour", "red"]) == 2
    assert "not trained with an asked colour" in capsys.readouterr().err


@pytest.mark.parametrize("format_", ["onnx", "tflite"])
def test_exports_take_the_asked_colour_and_read_as_the_keras_model(colour_run, tmp_path, format_, capsys):
    out, check = colour_run
    exported = tmp_path / f"m.{format_}"
    assert export_safe.main(["--in_keras", str(out / "crnn_ctc_best.keras"), "--out_keras", str(exported),
                             "--format", format_]) == 0
    network, meta = reader.load(exported)
    keras_model, _ = model.load_model(out / "crnn_ctc_best.keras")
    batch = export_safe.parity_batch(keras_model, count=3, seed=2)
    assert batch.shape[-1] == 5  # colour and two planes
    assert np.max(np.abs(network.predict_on_batch(batch) - keras_model.predict_on_batch(batch))) < 1e-4
    labels = ["--folder", str(check), "--labels", str(check / "labels.csv")]
    assert read_captchas.main(["--model", str(exported), *labels]) == 0
    from_export = capsys.readouterr().out
    assert "64 labelled images: exact match 1.0000" in from_export


def test_the_server_takes_the_asked_colour_as_a_form_field_or_json_key(colour_run):
    out, _ = colour_run
    picture = cv2.imencode(".png", bar_picture("hv", ["red", "blue"]))[1].tobytes()
    with started_server("--model", out / "crnn_ctc_best.onnx") as url:
        status, answer = call(f"{url}/read", *multipart("image", [("one.png", picture)], {"colour": "red"}))
        assert status == 200 and answer["text"] == "h"
        status, answer = call(f"{url}/read", json.dumps({"image": base64.b64encode(picture).decode(),
                                                          "color": "blue"}).encode(), "application/json")
        assert status == 200 and answer["text"] == "v"
        body = json.dumps({"images": [base64.b64encode(picture).decode()] * 2, "colour": ["red", "blue"]}).encode()
        status, answer = call(f"{url}/read_batch", body, "application/json")
        assert status == 200 and [r["text"] for r in answer["results"]] == ["h", "v"]
        status, answer = call(f"{url}/read", *multipart("image", [("one.png", picture)], {"colour": "pink"}))
        assert status == 400 and answer["error"] == "unknown colour 'pink': this model knows blue, red"
        status, answer = call(f"{url}/read", *multipart("image", [("one.png", picture)]))
        assert status == 400 and "give one of blue, red" in answer["error"]
        assert call(f"{url}/model")[1]["colours"] == ["blue", "red"]


# ----------------------------------------------------------------------------- the synthetic style and the teacher


def test_the_colours_style_labels_each_captcha_with_its_asked_inks_symbols(tmp_path):
    written = synth.generate_synthetic(tmp_path / "a", 6, synth.Drawing("colours", "ABC", 6), seed=3, workers=1,
                                       progress=False)
    again = synth.generate_synthetic(tmp_path / "b", 6, synth.Drawing("colours", "ABC", 6), seed=3, workers=1,
                                     progress=False)
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in again]  # seeded
    found = label_sources.find_labels(tmp_path / "a", labels_file=tmp_path / "a" / "labels.csv")
    assert len(found.samples) == 6 and set(found.asked.values()) <= set(synth.INKS)
    for job, (path, label) in zip(synth.plan_synthetic(6, 3, "ABC", 6, 200, 60), found.samples):
        text, seed = job[:2]
        inks, asked = synth.colour_plan(text, seed)
        assert found.asked[path] == asked and label == "".join(s for s, ink in zip(text, inks) if ink == asked)
        assert 1 <= len(label) <= 6 and len(set(inks)) <= synth.COLOURS_SHOWN


def test_ddddocr_is_told_the_asked_colour_by_its_own_names():
    assert teacher.ddddocr_colour_filter("red") == {"color_filter_colors": ["red"]}
    assert teacher.ddddocr_colour_filter(None) == {}
    with pytest.raises(CaptchaError, match="does not know the colour 'teal'; it knows red, blue"):
        teacher.check_ddddocr_colours(["red", "teal"])


def test_scan_says_why_a_colour_folder_reads_in_colour(tmp_path):
    folder = two_colour_folder(tmp_path / "d", 8, 4)
    printed = subprocess.run([sys.executable, "dataset.py", "scan", str(folder), "--labels", str(folder / "labels.csv")],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "2 colours (blue, red)" in printed and "channels: colour (3), since each image is read with the colour" \
        in printed


def test_networkspeed_times_an_asked_colour_network_beside_a_plain_one(colour_run, onnx_model, capsys):
    from tools import networkspeed

    out, _ = colour_run
    assert networkspeed.main([str(onnx_model), str(out / "crnn_ctc_best.onnx"), "--batch", "2", "--rounds", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("batch 2: ") and float(printed.rsplit("B / A = ", 1)[1]) > 0


def test_test_py_reads_with_ddddocr_through_its_colour_filter(tmp_path, capsys):
    pytest.importorskip("ddddocr")
    picture = tmp_path / "one.png"
    cv2.imwrite(str(picture), cv2.resize(bar_picture("hv", ["red", "blue"]), (128, 64)))
    assert read_captchas.main(["--model", "ddddocr", "--image", str(picture), "--colour", "red"]) == 0
    assert capsys.readouterr().out.startswith(f"{picture} -> ")
    assert read_captchas.main(["--model", "ddddocr", "--image", str(picture), "--colour", "teal"]) == 2
    assert "unknown colour 'teal': ddddocr knows red, blue" in capsys.readouterr().err
