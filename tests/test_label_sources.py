"""Where labels come from (file-name rules, labels files), letter case, colour and the canvas."""

import hashlib
import json

import cv2
import numpy as np
import pytest

import dataset
import export_safe
import finetune
import label_sources
import model
import modelmeta
import charsets
import imagefiles
import preprocess
import reader
import runstate
import test as read_captchas  # the project's test.py (reads captchas), not a test module
import train
from charsets import Charset
from errors import CaptchaError
from preprocess import Canvas, PreprocessOptions

LABELS = ["4821", "0375", "9912", "5550", "1234", "708a", "q3z9", "zzk2", "m0p4", "h7h7", "3b3b", "w2e9"]


def write_images(folder, names, size=(30, 90)):
    """Small distinct images (gray noise with a colour bar) under the given file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        rng = np.random.default_rng(i)
        image = rng.integers(150, 256, size + (3,), dtype=np.uint8)
        image[10:20, 5 + 3 * (i % 10): 40 + 3 * (i % 10)] = (20 * (i % 7), 200, 40)
        cv2.imwrite(str(folder / name), image)
    return folder


def read(folder, **kwargs):
    found = label_sources.find_labels(folder, **kwargs)
    return {p.split("/")[-1]: label for p, label in found.samples}, found


# ----------------------------------------------------------------------------- file-name rules


def test_auto_reads_plain_names_and_their_duplicates(tmp_path):
    names = [f"{label}.png" for label in LABELS] + ["4821_1.png", "0375-2.png"]
    got, found = read(write_images(tmp_path, names))
    assert found.source.rule == "name" and got["4821_1.png"] == "4821" and got["0375-2.png"] == "0375"
    assert got == {**{f"{label}.png": label for label in LABELS}, "4821_1.png": "4821", "0375-2.png": "0375"}
    assert "rule 'name' (auto" in found.decision and "4821_1.png -> '4821'" not in found.decision  # two examples


def test_auto_reads_label_then_hash_as_dddd_trainer_names_them(tmp_path):
    names = [f"{label}_{hashlib.md5(label.encode()).hexdigest()}.jpg" for label in LABELS]
    got, found = read(write_images(tmp_path, names))
    assert found.source.rule == "prefix"
    assert sorted(got.values()) == sorted(LABELS)
    assert "rule 'prefix'" in found.decision and "suffix: hex strings" in found.decision


def test_auto_reads_numbered_id_then_label(tmp_path):
    names = [f"{i:05d}_{label}.png" for i, label in enumerate(LABELS)]
    got, found = read(write_images(tmp_path, names))
    assert found.source.rule == "suffix" and got["00000_4821.png"] == "4821" and got["00011_w2e9.png"] == "w2e9"
    assert "prefix: consecutive numbers 0-11" in found.decision


def test_explicit_rules_and_a_regex(tmp_path):
    folder = write_images(tmp_path, ["captcha-ab12-x.png", "captcha-cd34-y.png", "other.png"])
    got, found = read(folder, labels_from=r"regex:captcha-(?P<label>\w+)-\w")
    assert got == {"captcha-ab12-x.png": "ab12", "captcha-cd34-y.png": "cd34"}
    assert found.skipped == {"no label in the file name (rule regex:captcha-(?P<label>\\w+)-\\w)":
                             [str(folder / "other.png")]}
    assert label_sources.label_from_filename("a_b_c.png", "prefix") == "a"
    assert label_sources.label_from_filename("a_b_c.png", "suffix") == "c"
    assert label_sources.label_from_filename("x9.png", r"regex:x(\d)") == "9"  # no named group: the first
    for bad, message in [("regex:(", "not a valid regular expression"), ("regex:abc", "needs a group"),
                         ("stem", "unknown --labels_from")]:
        with pytest.raises(CaptchaError, match=message):
            label_sources.find_labels(folder, labels_from=bad)


@pytest.mark.parametrize("names, why", [
    ([hashlib.md5(label.encode()).hexdigest() + ".png" for label in LABELS], "hex strings of 32 characters"),
    ([f"{i}.png" for i in range(1, 13)], "consecutive numbers 1-12"),
    ([f"IMG_{1000 + i}.png" for i in range(12)], "consecutive numbers 1000-1011"),
])
def test_auto_refuses_names_that_are_ids_or_hashes(tmp_path, names, why):
    with pytest.raises(CaptchaError, match="do not look like labels") as error:
        label_sources.find_labels(write_images(tmp_path, names))
    assert why in str(error.value) and "--labels FILE" in str(error.value)


def test_auto_refuses_a_folder_it_cannot_decide(tmp_path):
    names = [f"{a}_{b}.png" for a, b in zip(LABELS, reversed(LABELS))]
    with pytest.raises(CaptchaError, match="cannot tell which part") as error:
        label_sources.find_labels(write_images(tmp_path, names))
    assert "--labels_from name|prefix|suffix" in str(error.value)


def test_train_refuses_hash_names_in_one_line_and_trains_nothing(tmp_path, capsys):
    folder = write_images(tmp_path / "hashes", [hashlib.md5(str(i).encode()).hexdigest() + ".png" for i in range(12)])
    assert train.main(["--data_dir", str(folder), "--preset", "tiny", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the file names do not look like labels")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- labels files

NUMBERED = [f"{i}.png" for i in range(1, 13)]
EXPECTED = {f"{i}.png": label for i, label in zip(range(1, 13), LABELS)}


@pytest.mark.parametrize("name, text", [
    ("labels.csv", "filename,label\n" + "".join(f"{i}.png,{label}\n" for i, label in zip(range(1, 13), LABELS))),
    ("labels.csv", "".join(f"{i}.png,{label}\n" for i, label in zip(range(1, 13), LABELS))),
    ("labels.txt", "".join(f"{i}.png\t{label}\n" for i, label in zip(range(1, 13), LABELS))),
    ("labels.json", json.dumps({f"{i}.png": label for i, label in zip(range(1, 13), LABELS)})),
    ("label_sources.py", repr({f"{i}.png": label for i, label in zip(range(1, 13), LABELS)})),  # single quotes
    ("labels.txt", "\n".join(LABELS) + "\n"),  # one label per line: line n labels n.png
])
def test_every_labels_file_format_reads_the_same_labels(tmp_path, name, text):
    folder = write_images(tmp_path / "images", NUMBERED)
    (tmp_path / name).write_text(text)
    got, found = read(folder, labels_file=tmp_path / name)
    assert got == EXPECTED and found.skipped == {}
    assert found.source.rule == "file" and found.source.sha256 == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def test_one_label_per_line_counts_from_zero_when_an_image_is_numbered_zero(tmp_path):
    folder = write_images(tmp_path / "images", [f"{i}.jpg" for i in range(3)])
    (tmp_path / "labels.txt").write_text("aaaa\nbbbb\ncccc\ndddd\n")
    got, found = read(folder, labels_file=tmp_path / "labels.txt")
    assert got == {"0.jpg": "aaaa", "1.jpg": "bbbb", "2.jpg": "cccc"}
    assert found.skipped == {"listed but missing on disk": ["line 4 ('dddd'): no image 3"]}


def test_labels_file_problems_are_skipped_and_counted_by_reason(tmp_path):
    folder = write_images(tmp_path / "images", ["1.png", "2.png", "3.png", "4.png", "5.png", "sub/6.png"][:5])
    write_images(folder / "sub", ["6.png"])
    (tmp_path / "labels.csv").write_text("1.png,abcd\n2.png,efgh\n2.png,efgh\n3.png,ijkl\n3.png,XXXX\n"
                                         "missing.png,mnop\nsub/6.png,qrst\n4.png,\n")
    got, found = read(folder, labels_file=tmp_path / "labels.csv")
    assert got == {"1.png": "abcd", "2.png": "efgh", "6.png": "qrst"}
    counts = {reason: len(items) for reason, items in found.skipped.items()}
    assert counts == {"listed twice": 2, "listed twice with different labels": 1, "listed but missing on disk": 1,
                      "empty label": 1, "no label in the labels file": 1}
    assert found.skipped["no label in the labels file"] == [str(folder / "5.png")]
    scan = dataset.scan_folder(folder, labels=label_sources.LabelSource.given(labels_file=tmp_path / "labels.csv"))  # the scan counts them with its own
    assert scan.summary() == ("3 usable images; skipped 1 empty label, 1 listed but missing on disk, 2 listed twice, "
                              "1 listed twice with different labels, 1 no label in the labels file")


def test_a_broken_labels_file_is_one_clear_error(tmp_path):
    folder = write_images(tmp_path / "images", NUMBERED[:3])
    for text, message in [("{'1.png': }", "neither a JSON object nor a Python dict"), ("", "is empty"),
                          ("1.png,abcd\nefgh\n", "some lines have a separator")]:
        (tmp_path / "labels.txt").write_text(text)
        with pytest.raises(CaptchaError, match=message):
            label_sources.find_labels(folder, labels_file=tmp_path / "labels.txt")
    with pytest.raises(CaptchaError, match="labels file does not exist"):
        label_sources.find_labels(folder, labels_file=tmp_path / "nope.csv")


CJK = ["降飞淀惶", "山水火木", "金土日月", "飞降惶淀", "月日土金", "木火水山", "惶淀飞降", "水山木火",
       "日月金土", "淀惶降飞", "火木山水", "土金月日"]


def test_labels_with_one_space_between_symbols_are_joined_and_the_decision_said(tmp_path):
    folder = write_images(tmp_path / "images", NUMBERED)
    (tmp_path / "labels.txt").write_text("".join(f"{i}.png\t{' '.join(label)}\n" for i, label in
                                                 zip(range(1, 13), CJK)), encoding="utf-8")
    got, found = read(folder, labels_file=tmp_path / "labels.txt")
    assert got == {f"{i}.png": label for i, label in zip(range(1, 13), CJK)}
    assert found.source.spaces == "join" and "'降 飞 淀 惶' -> '降飞淀惶'" in found.decision
    kept, found = read(folder, labels_file=tmp_path / "labels.txt", spaces="keep")
    assert kept["1.png"] == "降 飞 淀 惶" and found.source.spaces == "keep"
    # a stored source reads the folder the same way again (a resume, test.py)
    again = label_sources.find_labels_as(folder, label_sources.LabelSource.from_dict(
        label_sources.find_labels(folder, labels_file=tmp_path / "labels.txt").source.to_dict()))
    assert dict(again.samples) == {str(folder / name): label for name, label in got.items()}
    # labels without spaces are untouched and nothing is said
    _, plain = read(write_images(tmp_path / "plain", [f"{label}.png" for label in LABELS]))
    assert plain.source.spaces == "keep" and "space" not in plain.decision


def test_labels_with_spaces_that_are_not_between_every_symbol_are_refused_unless_a_flag_says(tmp_path, capsys):
    folder = write_images(tmp_path / "images", NUMBERED)
    mixed = ["a b c d", "ab cd"] + [" ".join(label) for label in LABELS[2:]]
    (tmp_path / "labels.csv").write_text("".join(f"{i}.png,{label}\n" for i, label in zip(range(1, 13), mixed)))
    with pytest.raises(CaptchaError, match=r"not one symbol between single spaces \(e.g. 'ab cd'"):
        label_sources.find_labels(folder, labels_file=tmp_path / "labels.csv")
    got, _ = read(folder, labels_file=tmp_path / "labels.csv", spaces="join")
    assert got["2.png"] == "abcd"
    assert train.main(["--data_dir", str(folder), "--labels", str(tmp_path / "labels.csv"), "--preset", "tiny",
                       "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--label_spaces join" in err[0] and not (tmp_path / "out").exists()


def test_a_few_stray_files_in_a_folder_of_names_are_skipped_by_reason_and_the_folder_trains(tmp_path, digits_folder,
                                                                                              capsys):
    """A user's folder: captchas named by their labels, plus an empty file, a truncated one, a text file and one
    named `bad name!.png`. The one label with a space is an odd one out against the rest, not a reason to refuse."""
    import shutil

    folder = tmp_path / "site"
    shutil.copytree(digits_folder, folder)
    first = sorted(folder.glob("*.png"))[0]
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(first.read_bytes()[:300])
    (folder / "notes.txt").write_text("labels typed on Monday\n")
    shutil.copy(first, folder / "bad name!.png")
    found = label_sources.find_labels(folder)
    assert len(found.samples) == 42 and found.source.spaces == "keep"  # 40, and the two broken files (read later)
    assert found.skipped == {"a space in the label, where 42 of 43 have none": [str(folder / "bad name!.png")]}
    assert "skipped as odd ones out (e.g. 'bad name!'" in found.decision
    assert train.main(["--data_dir", str(folder), "--preset", "tiny", "--init_from", "none", "--epochs", "1",
                       "--batch_size", "8", "--workers", "1", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 a space in the label, where 42 of 43 have none, 1 empty file, 1 not a readable image" in out


def test_odd_ones_out_against_cnocr_labels_are_skipped_and_a_real_mix_refused():
    cnocr = [" ".join(label) for label in CJK] * 2  # 24 labels with one space between symbols
    mode, why, odd = label_sources.decide_spaces(cnocr + ["降飞淀惶"])
    assert mode == "join" and odd == {"降飞淀惶": "not one symbol between single spaces, where 24 of 25 are"}
    assert "1 not written so skipped" in why
    with pytest.raises(CaptchaError, match="pass --label_spaces join"):
        label_sources.decide_spaces(cnocr[:12] + CJK[:6])  # a third unspaced: neither reading is safe
    assert label_sources.decide_spaces(["abc", "a b"], "keep") == ("keep", "", {})  # a flag decides, nothing skipped


def test_a_charset_file_of_one_symbol_per_line_is_read_in_order_and_checked(tmp_path):
    (tmp_path / "dict.txt").write_text("降\n飞\n\n淀\n", encoding="utf-8")
    assert charsets.charset_from_arg(str(tmp_path / "dict.txt")).symbols == "降飞淀"
    for text, message in [("降\n降\n", "listed twice"), ("降飞\n", "line 1 holds '降飞', not one symbol"),
                          ("\n", "no symbols")]:
        (tmp_path / "dict.txt").write_text(text, encoding="utf-8")
        with pytest.raises(CaptchaError, match=message):
            charsets.charset_from_arg(str(tmp_path / "dict.txt"))


def test_a_changed_labels_file_is_refused_for_a_stored_source(tmp_path):
    folder = write_images(tmp_path / "images", NUMBERED)
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    source = label_sources.find_labels(folder, labels_file=tmp_path / "labels.txt").source
    assert len(label_sources.find_labels_as(folder, source).samples) == 12
    (tmp_path / "labels.txt").write_text("\n".join(reversed(LABELS)))
    with pytest.raises(CaptchaError, match="changed since the run started"):
        label_sources.find_labels_as(folder, source)


# ----------------------------------------------------------------------------- scan = train, charset, case


def test_linked_sub_folders_are_read_and_a_link_loop_is_read_once(tmp_path):
    # a data folder put together from links (`ln -s /big/disk/site data/site`) must not lose the linked part
    outside = write_images(tmp_path / "elsewhere", [f"{label}.png" for label in LABELS[6:]])
    data = write_images(tmp_path / "data" / "own", [f"{label}.png" for label in LABELS[:6]]).parent
    (data / "linked").symlink_to(outside, target_is_directory=True)
    (outside / "back").symlink_to(data, target_is_directory=True)  # a loop
    paths = imagefiles.list_images(data)
    assert sorted(label_sources.label_from_filename(p) for p in paths) == sorted(LABELS)
    assert len({p.resolve() for p in paths}) == len(paths) == len(LABELS)


def test_the_scan_and_train_read_a_folder_alike(tmp_path, capsys):
    folder = write_images(tmp_path / "f", [f"{label}_{hashlib.md5(label.encode()).hexdigest()}.png" for label in LABELS])
    cfg = train.TrainConfig(data_dir=str(folder))
    charset, max_len, train_set, val_set, test_set, scan, _ = train.load_dataset(cfg, folder)
    assert sorted(train_set + val_set + test_set) == sorted(dataset.scan_folder(folder).samples)
    assert dataset.main(["scan", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"charset: {len(charset.symbols)} symbols {charset.symbols!r}; labels up to {max_len}" in out
    with pytest.raises(CaptchaError, match="resolved from the labels"):
        charsets.charset_from_arg("auto")  # never the literal symbols a, u, t, o


def test_case_auto_folds_labels_typed_in_one_case_and_keeps_mixed_ones():
    assert dataset.decide_case(["abc1", "xyz2"]) == "lower" and dataset.decide_case(["AB1", "CD"]) == "upper"
    assert dataset.decide_case(["aBc", "xyz"]) == "keep" and dataset.decide_case(["1234"]) == "keep"
    assert dataset.decide_case(["aBc"], "lower") == "lower"
    with pytest.raises(CaptchaError, match="unknown --case"):
        dataset.decide_case(["a"], "title")


def test_case_lower_folds_the_labels_a_run_trains_on(tmp_path):
    folder = write_images(tmp_path / "f", ["AbCd.png", "abcd_1.png", "XyZw.png", "QQqq.png"])
    scan = dataset.scan_folder(folder, case="lower")
    assert sorted(label for _, label in scan.samples) == ["abcd", "abcd", "qqqq", "xyzw"] and scan.case == "lower"
    assert dataset.scan_folder(folder).case == "keep"


def always_reads(text_class, charset, path, meta_extra, channels=1):
    """A tiny model whose every time step reads class `text_class` (so greedy decoding gives one symbol)."""
    config, canvas = model.PRESETS["tiny"], Canvas(channels=channels)
    crnn = model.build_model(config, charset.num_classes, canvas)
    kernel, bias = crnn.layers[-1].get_weights()
    bias[:] = -10.0
    bias[text_class] = 10.0
    crnn.layers[-1].set_weights([np.zeros_like(kernel), bias])
    options = PreprocessOptions(canvas)
    model.save_model(crnn, path, {**modelmeta.make_meta(charset, 4, options, config), **meta_extra})
    return path


def test_the_stored_case_fold_is_applied_by_every_reader(tmp_path, capsys):
    charset = Charset("Aa")
    path = always_reads(charset.encode("A")[0], charset, tmp_path / "m.keras", {"case": "lower"})
    folder = write_images(tmp_path / "images", ["A.png", "a_1.png"])
    assert reader.Reader(path).read(folder / "A.png").text == "a"
    assert reader.Reader.load(path, case="keep").read(folder / "A.png").text == "A"
    onnx_path = tmp_path / "m.onnx"
    assert export_safe.main(["--in_keras", str(path), "--out_keras", str(onnx_path), "--format", "onnx"]) == 0
    assert reader.Reader(onnx_path).read(folder / "A.png").text == "a"
    capsys.readouterr()
    # test.py folds labels and readings alike: A.png's label "A" is scored as "a"
    assert read_captchas.main(["--model", str(onnx_path), "--folder", str(folder)]) == 0
    assert "2 labelled images: exact match 1.0000" in capsys.readouterr().out
    assert read_captchas.main(["--model", str(onnx_path), "--folder", str(folder), "--case", "keep"]) == 0
    assert "2 labelled images: exact match 0.5000" in capsys.readouterr().out


def test_test_py_scores_with_the_models_naming_rule_or_a_labels_file(tmp_path, capsys):
    charset = Charset("0123456789")
    path = always_reads(charset.encode("7")[0], charset, tmp_path / "m.keras", {"labels": {"rule": "prefix"}})
    folder = write_images(tmp_path / "images", ["7_f00d.png", "3_beef.png"])
    assert read_captchas.main(["--model", str(path), "--folder", str(folder)]) == 0
    assert "2 labelled images: exact match 0.5000" in capsys.readouterr().out
    numbered = write_images(tmp_path / "numbered", ["1.png", "2.png", "3.png"])
    (tmp_path / "labels.json").write_text(json.dumps({"1.png": "7", "2.png": "7", "3.png": "1"}))
    assert read_captchas.main(["--model", str(path), "--folder", str(numbered), "--labels",
                               str(tmp_path / "labels.json")]) == 0
    assert "3 labelled images: exact match 0.6667" in capsys.readouterr().out
    # a model trained from a labels file, given none: the names are tried with auto, which finds ids
    path = always_reads(charset.encode("7")[0], charset, tmp_path / "m2.keras", {"labels": {"rule": "file"}})
    assert read_captchas.main(["--model", str(path), "--folder", str(write_images(tmp_path / "n12", NUMBERED))]) == 0
    captured = capsys.readouterr()
    assert "labelled images" not in captured.out and "not scored: the file names do not look like labels" in captured.err


# ----------------------------------------------------------------------------- colour and canvas


def test_colour_pixels_are_the_same_for_training_and_every_reading_path(tmp_path):
    folder = write_images(tmp_path / "images", ["ab12.png", "cd34.png"])
    charset = Charset("abcd1234")
    path = always_reads(1, charset, tmp_path / "colour.keras", {}, channels=3)
    colour_reader = reader.Reader(path)
    options = colour_reader.options
    assert options.canvas.channels == 3
    samples = [(str(folder / "ab12.png"), "ab12"), (str(folder / "cd34.png"), "cd34")]
    batch, _ = dataset.make_batches(samples, charset, 4, dataset.Batching(options=options, batch_size=2), workers=1)[0]
    assert batch.shape == (2, 50, 200, 3)
    for image, (file, _) in zip(batch, samples):
        prepared, error = colour_reader.prepare(file)
        assert error is None and np.array_equal(prepared, image)
        uploaded = colour_reader.prepare_encoded((folder / file.split("/")[-1]).read_bytes(), "upload")
        assert np.array_equal(uploaded, image)
    assert not np.allclose(batch[..., 0], batch[..., 1])  # the colour is there, not three copies of gray
    gray = preprocess.load_image(samples[0][0], PreprocessOptions())
    assert gray.shape == (50, 200, 1)


def test_a_start_model_changes_channels_and_reads_gray_the_same(tmp_path):
    config = model.PRESETS["tiny"]
    gray_model = model.build_model(config, 5)
    colour_model, fresh = finetune.start_from(gray_model, {"charset": Charset("abcd").to_dict()}, Charset("abcd"),
                                              config, PreprocessOptions(Canvas(channels=3)))
    assert fresh == "" and colour_model.input_shape == (None, 50, 200, 3)
    x = np.random.default_rng(0).random((2, 50, 200, 1), dtype=np.float32)
    np.testing.assert_allclose(colour_model.predict_on_batch(np.repeat(x, 3, axis=-1)),
                               gray_model.predict_on_batch(x), atol=1e-5)
    # and back: a colour start model (first kernel made uneven across the channels) for a gray run
    first_conv = next(layer for layer in colour_model.layers if layer.weights)
    kernel, *rest = first_conv.get_weights()
    first_conv.set_weights([kernel * np.array([0.5, 1.0, 1.5], np.float32)[:, None], *rest])
    narrowed, _ = finetune.start_from(colour_model, {"charset": Charset("abcd").to_dict(),
                                                     "preprocess": PreprocessOptions(Canvas(channels=3)).to_dict()},
                                      Charset("abcd"), config, PreprocessOptions())
    assert narrowed.input_shape == (None, 50, 200, 1)
    np.testing.assert_allclose(narrowed.predict_on_batch(x), colour_model.predict_on_batch(np.repeat(x, 3, axis=-1)),
                               atol=1e-5)


def write_gray_images(folder, names, extension=".jpg"):
    """Gray noise with a dark bar, saved as colour JPEGs (three equal channels), as many sites serve gray captchas."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        gray = np.random.default_rng(100 + i).integers(150, 256, (30, 90), dtype=np.uint8)
        gray[10:20, 5 + 3 * (i % 10): 40 + 3 * (i % 10)] = 30
        cv2.imwrite(str(folder / (name + extension)), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    return folder


def test_channels_auto_reads_colour_images_in_colour_and_gray_ones_in_gray(tmp_path, capsys):
    colour = write_images(tmp_path / "colour", [f"{label}.png" for label in LABELS])
    gray = write_gray_images(tmp_path / "gray", LABELS)
    assert dataset.scan_folder(colour, channels=0).channels()[0] == 3
    assert dataset.scan_folder(gray, channels=0).channels()[0] == 1
    assert dataset.scan_folder(colour).channels() == (None, "")  # with channels given, colour is not measured
    # the median image decides: 5 colour of 12 read gray, 7 of 12 colour
    mixed = write_gray_images(tmp_path / "mixed", LABELS[5:])
    write_images(mixed, [f"{label}.png" for label in LABELS[:5]])
    assert dataset.scan_folder(mixed, channels=0).channels()[0] == 1
    write_images(tmp_path / "mixed2", [f"{label}.png" for label in LABELS[:7]])
    write_gray_images(tmp_path / "mixed2", LABELS[7:])
    channels, line = dataset.scan_folder(tmp_path / "mixed2", channels=0).channels()
    assert channels == 3 and "7 of 12 carry colour" in line
    # a run with no --channels trains on the decision, says it, and stores it for every reader
    for folder, channels, said in ((colour, 3, "colour (3)"), (gray, 1, "gray (1)")):
        out = tmp_path / f"run{channels}"
        assert train.main(["--data_dir", str(folder), "--preset", "tiny", "--init_from", "none", "--epochs", "1",
                           "--batch_size", "4", "--workers", "1", "--out", str(out)]) == 0
        assert f"channels: {said}, decided from the images" in capsys.readouterr().out
        assert modelmeta.read_meta(out / runstate.BEST_NAME)["preprocess"]["channels"] == channels
        assert reader.Reader(out / runstate.BEST_NAME).prepare(next(folder.iterdir()))[0].shape == (50, 200, channels)
    assert train.main(["--data_dir", str(colour), "--channels", "2", "--out", str(tmp_path / "r")]) == 2
    assert "--channels 2: 0 (auto), 1 (gray) or 3 (colour)" in capsys.readouterr().err


def test_the_canvas_widens_for_wide_captchas_and_the_check_counts_the_steps_the_text_spans(capsys):
    config, canvas = model.PRESETS["fast"], Canvas(channels=3)
    assert model.fit_canvas(config, canvas, median_aspect=2.4) == canvas  # fits 200x50
    wide = model.fit_canvas(config, canvas, median_aspect=8.0)
    assert wide == Canvas(50, 400, 3) and "canvas: 400x50, widened" in capsys.readouterr().out
    assert model.fit_canvas(config, canvas, width=240, median_aspect=8.0).width == 240  # --width wins
    with pytest.raises(CaptchaError, match="multiple of 4"):
        model.fit_canvas(config, canvas, width=201, median_aspect=1.0)
    with pytest.raises(CaptchaError, match="--height 64: the start model base reads 50-row images"):
        model.fit_canvas(config, canvas, height=64, median_aspect=1.0, start_model="base")
    # a square captcha fills 50 of 200 columns: 12 of 50 steps, too few for 14 characters
    with pytest.raises(CaptchaError, match=r"spans 12 time steps \(the folder's median image fills 12 of the 50"):
        model.check_time_steps(50, 14, Canvas(), 1.0)
    model.check_time_steps(50, 14, Canvas(), 4.0)
    assert "warning" not in capsys.readouterr().out


def test_a_run_with_a_labels_file_stores_its_source_and_case(tmp_path, capsys):
    folder = write_images(tmp_path / "images", NUMBERED)
    (tmp_path / "labels.csv").write_text("".join(f"{i}.png,{label.upper()}\n" for i, label in zip(range(1, 13), LABELS)))
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(folder), "--labels", str(tmp_path / "labels.csv"), "--preset", "tiny",
                       "--init_from", "none", "--epochs", "1", "--batch_size", "4", "--workers", "1",
                       "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"labels: {tmp_path / 'labels.csv'} (CSV, 12 entries" in printed and "letter case: upper (folded)" in printed
    meta = modelmeta.read_meta(out / runstate.BEST_NAME)
    assert meta["labels"]["rule"] == "file" and meta["case"] == "upper"
    assert meta["labels"]["sha256"] == hashlib.sha256((tmp_path / "labels.csv").read_bytes()).hexdigest()


def test_a_colour_run_fine_tunes_the_base_model_and_exports_read_alike(tmp_path, capsys):
    folder = write_images(tmp_path / "images", [f"{label}.png" for label in LABELS])
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(folder), "--channels", "3", "--epochs", "1", "--batch_size", "4",
                       "--workers", "1", "--out", str(out)]) == 0
    assert "input 200x50 colour" in capsys.readouterr().out
    best = out / runstate.BEST_NAME
    meta = modelmeta.read_meta(best)
    assert meta["preprocess"]["channels"] == 3 and "channels" not in meta["model_config"]  # the canvas, stored once
    onnx_path = tmp_path / "colour.onnx"
    assert export_safe.main(["--in_keras", str(best), "--out_keras", str(onnx_path), "--format", "onnx"]) == 0
    keras_reader, onnx_reader = reader.Reader(best), reader.Reader(onnx_path)
    image, _ = keras_reader.prepare(folder / "4821.png")
    assert image.shape == (50, 200, 3)
    np.testing.assert_allclose(onnx_reader.network.predict_on_batch(image[np.newaxis]),
                               keras_reader.network.predict_on_batch(image[np.newaxis]), atol=1e-4)


def test_train_help_shows_each_flags_comment(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--labels_from LABELS_FROM where file names hold the label: auto (decided from all the names" in text
    assert "--case CASE letter case of the labels: keep, lower, upper (folded), auto" in text
    # a comment's continuation lines too, and a comment line of its own (above a group of fields) in none
    assert ("end once the validation CER has held this many epochs (0: never; the recipe's: 10 for default, never for "
            "reference and kerasio) (default: None)") in text
    assert "Settings left unset" not in text


def test_raw_format_copies_are_read_as_the_plain_folder(tmp_path, capsys):
    from tools import rawformats

    source = write_images(tmp_path / "plain", [f"{label}.png" for label in LABELS])
    assert rawformats.main([str(source), str(tmp_path / "raw")]) == 0
    assert len(list((tmp_path / "raw" / "id").iterdir())) == 12
    capsys.readouterr()
    assert rawformats.main([str(source), str(tmp_path / "raw"), "--compare"]) == 0
    verdicts = [line for line in capsys.readouterr().out.splitlines() if "split labels" in line]
    assert [line.split(";")[0] for line in verdicts] == ["md5: rule prefix", "id: rule suffix", "csv: rule file",
                                                          "json: rule file"]
    assert all("identical to" in line for line in verdicts)
