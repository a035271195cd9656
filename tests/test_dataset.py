"""dataset.py and augment.py: a folder scanned into labelled images, the split, the batch loader (augmentation,
canvases in memory, worker processes)."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import augment
import dataset
import charsets
import preprocess
import runstate
import train
from conftest import DIGITS, ROOT, captcha_like
from charsets import Charset
from errors import CaptchaError
from preprocess import PreprocessOptions


def batch_pixels(batches, index=0):
    return batches[index][0]


def test_augmentation_changes_training_pixels_every_epoch_and_repeats_with_the_seed(samples):
    def training_batches():
        return dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=8, shuffle=False, seed=3, augment="light"), workers=1)

    batches = training_batches()
    epoch0 = batch_pixels(batches)
    assert np.array_equal(epoch0, batch_pixels(batches))  # the same epoch reads the same pixels again
    batches.on_epoch_end()
    epoch1 = batch_pixels(batches)
    plain = np.stack([preprocess.load_image(path) for path, _ in samples])
    assert epoch0.shape == epoch1.shape == plain.shape and epoch0.dtype == np.float32
    for image in range(len(samples)):  # every image is altered, and altered differently each epoch
        assert not np.array_equal(epoch0[image], plain[image])
        assert not np.array_equal(epoch0[image], epoch1[image])
    assert np.array_equal(batch_pixels(training_batches()), epoch0)  # a rerun with the seed repeats it
    assert np.array_equal(batches[0][1], training_batches()[0][1])  # labels are untouched


def test_validation_and_test_batches_are_never_augmented(samples):
    train_batches, val_batches, test_batches = dataset.split_batches(
        (samples[:4], samples[4:6], samples[6:]), Charset(DIGITS), 4,
        dataset.Batching(PreprocessOptions(), batch_size=2, shuffle=True, augment="strong"), dataset.Loading(workers=1))
    assert train_batches.augment == "strong" and train_batches.shuffle
    for batches, part in [(val_batches, samples[4:6]), (test_batches, samples[6:])]:
        assert batches.augment == "none" and not batches.shuffle
        for epoch in range(2):  # the same pixels as the plain pipeline, epoch after epoch
            assert np.array_equal(batch_pixels(batches), np.stack([preprocess.load_image(p) for p, _ in part]))
            batches.on_epoch_end()


def test_the_clean_finish_reads_the_images_as_they_are(samples):
    batches = dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=8, seed=3, augment="light", augment_epochs=2), workers=1)
    plain = np.stack([preprocess.load_image(path) for path, _ in samples])
    for epoch in range(4):  # epochs 0 and 1 altered, 2 and 3 (the clean finish) as they are
        pixels = batch_pixels(batches)
        assert np.array_equal(pixels, plain) == (epoch >= 2)
        batches.on_epoch_end()
    batches.epoch = 1  # a resumed run sets the loader's epoch: what it reads follows it
    assert not np.array_equal(batch_pixels(batches), plain)


def test_epochs_of_a_fixed_number_of_steps_run_through_shuffled_passes(samples):
    """A run that follows validation checks it every few steps: its epochs are `epoch_steps` batches of an endless
    run of passes, each pass every image once in its own order, the same in every rerun and after a resume."""
    def labels_of_epochs(batches, epochs):
        rows = []
        for epoch in range(epochs):
            batches.epoch = epoch
            rows += [tuple(label) for index in range(len(batches)) for label in batches[index][1]]
        return rows

    batches = dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=3, seed=5, shuffle=True, augment="light", epoch_steps=5), workers=1)
    assert len(batches) == 5  # 8 images, batches of 3: a pass is 3 batches (3, 3, 2); an epoch is 5 batches
    seen = labels_of_epochs(batches, 3)  # 15 batches: 5 passes
    assert len(seen) == 5 * 8
    everyone = sorted(tuple(label) for label in dataset.encode_labels([label for _, label in samples],
                                                                      Charset(DIGITS), 4))
    passes = [seen[i * 8:(i + 1) * 8] for i in range(5)]
    assert all(sorted(one) == everyone for one in passes)  # each pass: every image once
    assert len({tuple(one) for one in passes}) > 1  # in an order of its own
    again = dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=3, seed=5, shuffle=True, augment="light", epoch_steps=5), workers=1)
    again.epoch = batches.epoch = 2  # a resumed run: epoch 2 reads as it did
    assert np.array_equal(again[1][0], batches[1][0])
    assert not np.array_equal(again[1][0], np.stack([preprocess.load_image(p) for p, _ in samples])[:3])
    again.augment_epochs = 2  # the anneal: from epoch 2 on, the images as they are
    pixels = again[0][0]
    order = again.pass_order((2 * 5) // 3)[(2 * 5) % 3 * 3:][:3]
    assert np.array_equal(pixels, np.stack([preprocess.load_image(samples[i][0]) for i in order]))


@pytest.mark.parametrize("level", ["light", "strong"])
def test_augmentation_keeps_the_canvas_and_is_mild(level):
    gray = np.full((50, 200), 230, np.uint8)
    gray[18:32, 40:160] = 20  # a dark bar standing for the text
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = augment.augment(gray, level, rng)
        assert out.shape == gray.shape and out.dtype == np.uint8
        # the text stays inside the canvas: nothing dark within 5 pixels of the left and right edges
        assert (out[:, :5] > 120).all() and (out[:, -5:] > 120).all()
        assert (out < 120).sum() > 0.5 * (gray < 120).sum()  # and is still there
    assert augment.augment(gray, "none", rng) is gray


def test_an_epoch_of_a_small_folder_passes_over_every_image_several_times(samples):
    batches = dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=4, shuffle=True, seed=3, augment="light", repeats=3), workers=1)
    assert len(batches) == 6  # 8 images x 3 passes, 4 a batch
    order = [int(i) for i in batches.order]
    assert sorted(order) == sorted(list(range(8)) * 3)
    images = np.concatenate([batches[i][0] for i in range(len(batches))])
    first, second = [images[k] for k, i in enumerate(order) if i == 0][:2]
    assert not np.array_equal(first, second)  # the same image, altered anew in each pass


def test_a_loader_set_to_an_epoch_gives_the_batches_of_an_unbroken_run(samples):
    """What --resume relies on: the order and the augmentation are drawn from (seed, epoch), so a loader told
    the epoch reads what one that went through the epochs before it reads."""
    def loader():
        return dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=4, shuffle=True, seed=3, augment="light"), workers=1, in_memory=True)

    unbroken, resumed = loader(), loader()
    for _ in range(3):
        unbroken.on_epoch_end()
    resumed.epoch = 3
    for index in range(len(unbroken)):
        (a, labels_a), (b, labels_b) = unbroken[index], resumed[index]
        assert np.array_equal(a, b) and np.array_equal(labels_a, labels_b)
    epoch_0 = loader()
    assert not np.array_equal(epoch_0.order, unbroken.order)  # another epoch, another order


def test_canvases_in_memory_give_the_pixels_read_from_disk(samples):
    streamed = dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=4, shuffle=True, seed=3, augment="light"), workers=1)
    cached = dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=4, shuffle=True, seed=3, augment="light"), workers=1, in_memory=True)
    assert streamed.canvases is None and cached.canvases.shape == (len(samples), 50, 200)
    for index in range(len(streamed)):
        assert np.array_equal(streamed[index][0], cached[index][0])


@pytest.mark.parametrize("in_memory", [True, False], ids=["canvases_in_memory", "streamed"])
def test_worker_processes_make_the_batches_threads_make(samples, in_memory):
    def loader(processes):
        return dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=3, shuffle=True, seed=3, augment="light"), workers=2, in_memory=in_memory, processes=processes)

    threads, processes = loader(0), loader(2)
    try:
        for epoch in (0, 2):
            threads.epoch = processes.epoch = epoch
            for index in range(len(threads)):
                (a, labels_a), (b, labels_b) = threads[index], processes[index]
                assert np.array_equal(a, b) and np.array_equal(labels_a, labels_b)
    finally:
        processes.close()
    assert processes.processes is None


def test_worker_processes_hand_each_batch_back_whole_when_many_threads_ask_at_once(samples):
    """Each batch comes back through a slot of shared memory: with more threads asking than slots, none may
    read a slot another batch is being written into."""
    def loader(processes):
        return dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(batch_size=2, shuffle=True, seed=5, augment="light"), workers=2, processes=processes)

    threads, processes = loader(0), loader(2)
    try:
        with ThreadPoolExecutor(6) as pool:  # 6 callers, 2 slots
            made = list(pool.map(processes.__getitem__, [i for _ in range(4) for i in range(len(processes))]))
        for k, (images, labels) in enumerate(made):
            expected_images, expected_labels = threads[k % len(threads)]
            assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
    finally:
        processes.close()


def test_worker_processes_without_the_shared_memory_they_need_are_refused_in_one_line(digits_folder, tmp_path,
                                                                                      monkeypatch, capsys):
    # a default Docker container's /dev/shm: 64 MiB; a write past it would kill the run with SIGBUS
    monkeypatch.setattr(dataset.shutil, "disk_usage", lambda folder: SimpleNamespace(free=64 * 2**20))
    args = ["--data_dir", str(digits_folder), "--preset", "tiny", "--epochs", "1", "--batch_size", "512",
            "--processes", "2", "--workers", "16", "--out", str(tmp_path / "run")]
    assert train.main(args) == 2
    error = capsys.readouterr().err
    assert "--processes: the worker processes need" in error and "/dev/shm has 64 MiB free" in error
    assert "Traceback" not in error
    dataset.check_shared_memory(64 * 2**20)  # what fits is let through


def test_bad_images_in_a_training_folder_are_skipped_and_counted(tmp_path, resume_data):
    folder = tmp_path / "messy"
    folder.mkdir()
    good = sorted(resume_data.iterdir())[:12]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    jpeg = cv2.imencode(".jpg", cv2.imread(str(good[0])))[1].tobytes()
    (folder / "1111.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated JPEG
    cv2.imwrite(str(folder / "2222.png"), np.zeros((10000, 10000), np.uint8))  # far too large
    (folder / "3333.png").write_bytes(b"")
    (folder / "4x44.png").write_bytes(good[0].read_bytes())  # 'x' is not a digit
    result = subprocess.run(
        [sys.executable, "train.py", "--data_dir", str(folder), "--preset", "tiny", "--epochs", "1", "--charset",
         "digits", "--batch_size", "4", "--workers", "1", "--out", str(tmp_path / "out"), "--verbose"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith(f"{folder}:")]
    assert summary == [f"{folder}: 12 usable images; skipped 1 empty file, 1 image too large, "
                       f"1 symbols outside the charset, 1 truncated image"]
    assert f"skipped (truncated image): {folder / '1111.jpg'}" in result.stdout
    assert (tmp_path / "out" / runstate.BEST_NAME).exists()


def test_scan_counts_bad_files_by_reason_and_keeps_good_ones(tmp_path):
    good = captcha_like()
    cv2.imwrite(str(tmp_path / "aB3xQ.png"), good)
    cv2.imwrite(str(tmp_path / "aB3xQ_1.png"), good)  # duplicate label
    (tmp_path / "nested").mkdir()
    cv2.imwrite(str(tmp_path / "nested" / "Zz9Yy.jpg"), good)
    cv2.imwrite(str(tmp_path / "ab#cd.png"), good)  # symbol outside the charset
    cv2.imwrite(str(tmp_path / "toolong.png"), good)  # 7 > max_len 5
    (tmp_path / "zero5.png").write_bytes(b"")
    (tmp_path / "texts.png").write_text("hello")
    png = (tmp_path / "aB3xQ.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 3])
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")

    result = dataset.scan_folder(tmp_path, Charset(), max_len=5)
    assert sorted(label for _, label in result.samples) == ["Zz9Yy", "aB3xQ", "aB3xQ"]
    counts = {reason: len(paths) for reason, paths in result.skipped.items()}
    assert counts == {"symbols outside the charset": 1, "labels longer than 5": 1, "empty file": 1,
                      "not a readable image": 2}
    assert "3 usable images" in result.summary() and "2 not a readable image" in result.summary()


def test_scan_of_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CaptchaError, match="does not exist"):
        dataset.scan_folder(tmp_path / "nope")


def test_split_is_fixed_by_seed_and_disjoint():
    samples = [(f"{i}.png", str(i)) for i in range(100)]
    train, val, test = dataset.split_samples(samples, 0.1, 0.1, seed=3)
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert set(train) | set(val) | set(test) == set(samples)
    assert not set(train) & set(test) and not set(val) & set(test)
    assert dataset.split_samples(samples, 0.1, 0.1, seed=3) == (train, val, test)
    assert dataset.split_samples(samples, 0.1, 0.1, seed=4)[2] != test


def test_batches_stream_padded_labels(digits_folder):
    samples = dataset.scan_folder(digits_folder).samples
    charset = charsets.charset_from_arg("digits")
    batches = dataset.make_batches(samples, charset, 4, dataset.Batching(batch_size=16, shuffle=True, seed=1), workers=1)
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (16, 50, 200, 1) and labels.shape == (16, 4) and labels.dtype == np.int32
    lengths = (labels != charsets.PAD_LABEL).sum(axis=1)
    assert set(lengths) <= {3, 4} and 3 in set((batches.labels != -1).sum(axis=1))
    first_order = batches.order.copy()
    batches.on_epoch_end()
    assert sorted(batches.order) == sorted(first_order) and list(batches.order) != list(first_order)
    last_images, _ = batches[2]
    assert len(last_images) == 40 - 32


def test_scan_command_summarises_and_lists_skipped_files(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "aB3xQ.png"), captcha_like())
    (tmp_path / "zero5.png").write_bytes(b"")
    assert dataset.main(["scan", str(tmp_path), "--verbose"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["labels: file names, rule 'name' (auto, from all 2 names: aB3xQ.png -> 'aB3xQ', zero5.png -> "
                   "'zero5')", "1 usable images; skipped 1 empty file",
                   "charset: 5 symbols 'BQax3'; labels up to 5 characters; letter case: keep",
                   "channels: gray (1), decided from the images: 0 of 1 carry colour in their strokes or background "
                   "(median 0, colour from 50); set it with --channels 1 or 3",
                   f"skipped (empty file): {tmp_path / 'zero5.png'}"]
    assert dataset.main(["scan", str(tmp_path / "missing")]) == 2
    assert "missing: folder does not exist" in capsys.readouterr().err


def test_split_keeps_every_image_of_a_label_on_one_side():
    samples = [(f"{i % 40}_{i // 40}.png", str(i % 40)) for i in range(120)]  # 40 labels, 3 images each
    parts = dataset.split_samples(samples, 0.1, 0.1, seed=1)
    labels = [{label for _, label in part} for part in parts]
    assert not labels[0] & labels[2] and not labels[1] & labels[2] and not labels[0] & labels[1]
    assert [len(part) for part in parts] == [96, 12, 12] and sum(parts, []) != [] and set(sum(parts, [])) == set(samples)
    with pytest.raises(CaptchaError, match="at least 3 different labels"):
        dataset.split_samples([("a.png", "a"), ("a_1.png", "a"), ("b.png", "b")])
