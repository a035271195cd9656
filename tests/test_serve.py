"""serve.py, started for real and called over HTTP: reading, bad requests, speed, and the site's answers
collected as labels (--collect, POST /feedback)."""

import base64
import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import labels as label_sources
import preprocess
import reader
import train
from conftest import READER, READER_IMAGES, ROOT, reader_labels
from tools.localhttp import call, free_port, multipart


@pytest.fixture(scope="module")
def server(onnx_model):
    """serve.py on a free port, as a user starts it: python serve.py --model M.onnx."""
    with serving(onnx_model, "--min_confidence", "0.5", "--max_image_bytes", "100000") as url:
        yield url


@contextlib.contextmanager
def serving(model_path, *flags):
    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", "--model", str(model_path), "--port", str(port), *flags],
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
    image = preprocess.list_images(digits_folder)[0].read_bytes()
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
    images = preprocess.list_images(READER_IMAGES[0].parent)
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
    assert reader.Reader(out / "crnn_ctc_best.keras").read_file(images[0])[0] == images[0].stem


def synthesised(folder):
    import synth

    return synth.generate_synthetic(folder, 6, seed=11, symbols="0123456789", length=4, workers=1, progress=False)
