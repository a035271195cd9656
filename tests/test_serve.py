"""serve.py, started for real and called over HTTP: reading, bad requests, speed, the site's answers collected as
labels (--collect, POST /feedback), and a folder of models served by name while files come and go (--models)."""

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import label_sources
import imagefiles
import reader
import train
from conftest import READER, READER_IMAGES, ROOT, reader_labels
from tools.localhttp import call, free_port, multipart


@pytest.fixture(scope="module")
def server(onnx_model):
    """serve.py on a free port, as a user starts it: python serve.py --model M.onnx."""
    with serving(onnx_model, "--min_confidence", "0.5", "--max_image_bytes", "100000") as url:
        yield url


def serving(model_path, *flags):
    """serve.py --model MODEL_PATH FLAGS..., yielding its URL while it runs."""
    return started_server("--model", model_path, *flags)


@contextlib.contextmanager
def started_server(*args):
    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", *map(str, args), "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(5000):  # until it answers: start-up speed is the machine's, so the cap is only against a hang
        if process.poll() is not None:
            pytest.fail(f"serve.py exited: {process.stdout.read()}")
        try:
            if call(f"{url}/health") == (200, {"status": "ok"}):
                break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"serve.py never answered /health: {process.communicate()[0]}")
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_server_reads_files_and_base64_like_test_py(server, onnx_model):
    paths = READER_IMAGES[:3]
    labels = reader_labels()[:3]
    expected = list(reader.Reader(onnx_model).read_paths(paths))
    assert [r.text for r in expected] == labels  # the reader reads these exactly
    status, answer = call(f"{server}/read", *multipart("image", [(paths[0].name, paths[0].read_bytes())]))
    assert status == 200 and answer["text"] == labels[0]
    assert answer["confidence"] == pytest.approx(expected[0].confidence, abs=1e-5)
    assert answer["low_confidence"] == (expected[0].confidence < 0.5) and answer["milliseconds"] > 0
    as_json = json.dumps({"image": base64.b64encode(paths[1].read_bytes()).decode()}).encode()
    status, answer = call(f"{server}/read", as_json, "application/json")
    assert status == 200 and answer["text"] == labels[1]
    status, answer = call(f"{server}/read_batch", *multipart("images", [(p.name, p.read_bytes()) for p in paths]))
    assert status == 200 and [r["text"] for r in answer["results"]] == labels
    batch_json = json.dumps({"images": [base64.b64encode(p.read_bytes()).decode() for p in paths]}).encode()
    status, answer = call(f"{server}/read_batch", batch_json, "application/json")
    assert status == 200 and [r["text"] for r in answer["results"]] == labels


def test_server_describes_its_model(server):
    status, answer = call(f"{server}/model")
    assert status == 200 and answer["charset"]["symbols"] == "0123456789" and answer["format"] == "onnx"
    assert answer["max_len"] == 4 and answer["preprocess"]["height"] == 50 and answer["min_confidence"] == 0.5


def test_server_answers_bad_requests_with_json_errors(server, digits_folder):
    image = imagefiles.list_images(digits_folder)[0].read_bytes()
    cases = [
        (multipart("image", [("notes.txt", b"not an image")]), 400, "notes.txt: not a readable image"),
        (multipart("image", [("big.png", image + bytes(200_000))]), 413, "limit"),
        (multipart("other", [("x.png", image)]), 400, "form field 'image'"),
        ((b'{"image": "@@@"}', "application/json"), 400, "not valid base64"),
        ((b"{not json", "application/json"), 400, "base64 image in 'image'"),
        ((image, "image/png"), 415, "multipart/form-data or application/json"),
        (multipart("image", [("a.png", image), ("b.png", image)]), 400, "use /read_batch"),
    ]
    for (body, content_type), status, message in cases:
        got_status, answer = call(f"{server}/read", body, content_type)
        assert (got_status, message in answer["error"]) == (status, True), answer
    assert call(f"{server}/health") == (200, {"status": "ok"})  # still serving


def test_speed_measures_the_server_under_concurrent_clients(server, digits_folder, capsys):
    from tools import speed

    assert speed.main(["serve", server, "--folder", str(digits_folder), "--limit", "6", "--clients", "3"]) == 0
    assert "6 requests from 3 concurrent clients" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the site's answers (--collect)


def read_one(url, path):
    return call(f"{url}/read", *multipart("image", [(path.name, path.read_bytes())]))[1]


def feedback(url, token, accepted):
    return call(f"{url}/feedback", json.dumps({"id": token, "accepted": accepted}).encode(), "application/json")


def test_feedback_files_accepted_readings_as_labels_and_rejected_ones_for_review(tmp_path):
    collect = tmp_path / "collected"
    with serving(READER, "--collect", collect, "--collect_max", "3") as url:
        right, wrong = READER_IMAGES[0], READER_IMAGES[1]
        answer = read_one(url, right)
        assert answer["text"] == right.stem and len(answer["id"]) == 32  # 128 random bits
        assert feedback(url, answer["id"], True)[0] == 200
        assert (collect / "accepted" / f"{right.stem}_{answer['id']}.png").read_bytes() == right.read_bytes()
        assert (collect / "accepted" / "labels.csv").read_text() == f"{right.stem}_{answer['id']}.png,{right.stem}\n"
        answer = read_one(url, wrong)
        status, filed = feedback(url, answer["id"], False)
        assert status == 200 and filed["filed"].endswith(f"rejected/{answer['id']}.png")
        assert (collect / "rejected" / "readings.csv").read_text() == f"{answer['id']}.png,{answer['text']}\n"
        # a repeated id, an unknown one, a malformed body: JSON 4xx, nothing written, still serving
        assert feedback(url, answer["id"], True)[0] == 409
        assert feedback(url, "0" * 32, True)[0] == 404
        assert call(f"{url}/feedback", b'{"id": 3, "accepted": "yes"}', "application/json")[0] == 400
        assert call(f"{url}/feedback", b"not json", "application/json")[0] == 400
        assert len(list((collect / "accepted").iterdir())) == 2 and len(list((collect / "rejected").iterdir())) == 2
        # the store is bounded: past --collect_max the oldest waiting image is dropped
        batch = call(f"{url}/read_batch", *multipart("images", [(p.name, p.read_bytes()) for p in READER_IMAGES[:4]]))
        ids = [result["id"] for result in batch[1]["results"]]
        assert feedback(url, ids[0], True)[0] == 404 and feedback(url, ids[3], True)[0] == 200
        assert call(f"{url}/health") == (200, {"status": "ok"})


def test_concurrent_feedback_files_each_image_once(tmp_path):
    collect = tmp_path / "collected"
    with serving(READER, "--collect", collect) as url:
        answers = [read_one(url, path) for path in READER_IMAGES] * 3  # every id posted three times at once
        statuses = {}

        def post(answer):
            status, _ = feedback(url, answer["id"], True)
            statuses.setdefault(answer["id"], []).append(status)

        threads = [threading.Thread(target=post, args=(answer,)) for answer in answers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(sorted(s) == [200, 409, 409] for s in statuses.values()) and len(statuses) == len(READER_IMAGES)
        found = label_sources.find_labels(collect / "accepted")  # the names, as train.py reads them
        assert sorted(label for _, label in found.samples) == sorted(reader_labels())
        assert len((collect / "accepted" / "labels.csv").read_text().splitlines()) == len(READER_IMAGES)


def test_a_simulated_site_drives_the_loop_and_train_py_learns_from_the_accepted_images(tmp_path, capsys):
    """The site is an oracle over labelled images: it accepts a reading when it equals the truth."""
    images = imagefiles.list_images(READER_IMAGES[0].parent)
    site = {path: path.stem for path in images}
    site.update({path: path.stem.split("_")[0] for path in
                 synthesised(tmp_path / "site")})  # images the reader misreads, so both answers come back
    collect = tmp_path / "collected"
    with serving(READER, "--collect", collect) as url:
        accepted = 0
        for path, truth in site.items():
            answer = read_one(url, path)
            accepted += answer["text"] == truth
            assert feedback(url, answer["id"], answer["text"] == truth)[0] == 200
    found = label_sources.find_labels(collect / "accepted")
    truths = {path.read_bytes(): truth for path, truth in site.items()}
    assert len(found.samples) == accepted >= len(images) and accepted < len(site)
    assert all(truths[Path(path).read_bytes()] == label for path, label in found.samples)  # every label is right
    assert len(list((collect / "rejected").glob("*.png"))) == len(site) - accepted
    out = tmp_path / "retrained"
    assert train.main(["--data_dir", str(collect / "accepted"), "--init_from", str(READER), "--epochs", "2",
                       "--batch_size", "4", "--workers", "1", "--out", str(out)]) == 0
    assert "labels: file names, rule 'prefix'" in capsys.readouterr().out
    assert reader.Reader(out / "crnn_ctc_best.keras").read(images[0]).text == images[0].stem


def synthesised(folder):
    import synth

    return synth.generate_synthetic(folder, 6, synth.Drawing(symbols="0123456789", length=4), seed=11, workers=1, progress=False)


def until(condition, what):
    """Waits for the server's folder thread to act; the cap is only against a hang, not a speed requirement."""
    for _ in range(3000):
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"never: {what}")


def test_a_folder_of_models_is_served_by_name_and_followed_without_a_failed_request(tmp_path, onnx_model, base_onnx,
                                                                                   thresholded_reader):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(onnx_model, models / "digits.onnx")
    shutil.copy(base_onnx, models / "base.onnx")
    image = READER_IMAGES[0]
    expected = {name: reader.Reader.load(path).read(image) for name, path in
                (("digits", onnx_model), ("base", base_onnx), ("third", onnx_model))}
    with started_server("--models", models, "--poll", "0.1") as url:
        status, listed = call(f"{url}/models")
        assert status == 200 and sorted(listed["models"]) == ["base", "digits"] and listed["refused"] == {}
        for name in ("digits", "base"):  # two networks in one process, each read by its name
            answer = call(f"{url}/read/{name}", *multipart("image", [(image.name, image.read_bytes())]))[1]
            assert answer["text"] == expected[name].text
            assert answer["confidence"] == pytest.approx(expected[name].confidence, rel=1e-4)
        assert expected["digits"].confidence != pytest.approx(expected["base"].confidence, rel=1e-3)
        status, answer = call(f"{url}/read", *multipart("image", [(image.name, image.read_bytes())]))
        assert status == 400 and "base, digits" in answer["error"]  # several models: the name is needed
        status, answer = call(f"{url}/read/nope", *multipart("image", [(image.name, image.read_bytes())]))
        assert status == 404 and "base, digits" in answer["error"]
        for name in ("..%2Fdigits.onnx", "%2E%2E", "..%5C..%5Cetc%5Cpasswd", "digits.onnx"):
            assert call(f"{url}/read/{name}", *multipart("image", [(image.name, image.read_bytes())]))[0] == 404

        # clients read both models in a loop while a model is added, one replaced and a broken file dropped in
        statuses, stop = {"digits": [], "base": []}, threading.Event()

        def client(name):
            body = multipart("image", [(image.name, image.read_bytes())])
            while not stop.is_set():
                statuses[name].append(call(f"{url}/read/{name}", *body)[0])

        clients = [threading.Thread(target=client, args=(name,)) for name in ("digits", "base")]
        for thread in clients:
            thread.start()
        try:
            shutil.copy(onnx_model, models / ".third.onnx.tmp")
            os.replace(models / ".third.onnx.tmp", models / "third.onnx")
            until(lambda: "third" in call(f"{url}/models")[1]["models"], "third.onnx served")
            shutil.copy(thresholded_reader[1], models / ".digits.onnx.tmp")
            os.replace(models / ".digits.onnx.tmp", models / "digits.onnx")
            until(lambda: call(f"{url}/models")[1]["models"]["digits"]["min_confidence"] is not None, "digits replaced")
            (models / "broken.onnx").write_bytes(b"not a model")
            until(lambda: "broken" in call(f"{url}/models")[1]["refused"], "broken.onnx refused")
            (models / "base.onnx").unlink()
            until(lambda: "base" not in call(f"{url}/models")[1]["models"], "base.onnx removed")
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        assert statuses["digits"] and set(statuses["digits"]) == {200}  # through the replacement
        served_base = statuses["base"][: statuses["base"].index(404)] if 404 in statuses["base"] else statuses["base"]
        assert served_base and set(served_base) == {200} and set(statuses["base"]) <= {200, 404}  # 404 once removed
        listed = call(f"{url}/models")[1]
        assert sorted(listed["models"]) == ["digits", "third"] and "not a readable ONNX model" in listed["refused"]["broken"]
        assert listed["models"]["digits"]["min_confidence"] == pytest.approx(thresholded_reader[2])
        answer = call(f"{url}/read/third", *multipart("image", [(image.name, image.read_bytes())]))[1]
        assert answer["text"] == expected["third"].text
        assert call(f"{url}/read/broken", *multipart("image", [(image.name, image.read_bytes())]))[0] == 404


def test_each_model_of_a_folder_collects_its_own_answers(tmp_path, onnx_model):
    models, collect = tmp_path / "models", tmp_path / "collected"
    models.mkdir()
    shutil.copy(onnx_model, models / "login.onnx")
    shutil.copy(onnx_model, models / "signup.onnx")
    with started_server("--models", models, "--collect", collect) as url:
        for name, path in (("login", READER_IMAGES[0]), ("signup", READER_IMAGES[1])):
            answer = call(f"{url}/read/{name}", *multipart("image", [(path.name, path.read_bytes())]))[1]
            assert feedback(url, answer["id"], True)[0] == 200
            assert (collect / name / "accepted" / f"{path.stem}_{answer['id']}.png").read_bytes() == path.read_bytes()
