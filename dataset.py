"""The data side of a run: a folder scanned into labelled images, the split, and the batch loader.

    python dataset.py scan DIR [--labels_from RULE | --labels FILE] [--verbose]

The scan reads labels the way label_sources.py says (file names or a labels file), folds their letter case
when asked, checks every image decodes and counts what it skips by reason; train.py, bench.py and the
scan command share it, so the pre-flight check and training agree on the same folder.
"""

import argparse
import functools
import math
import multiprocessing
import os
import queue
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import cv2
import numpy as np

import cli
import augment as augment_module  # `augment` is also the loader's option name
import label_sources
from charsets import PAD_LABEL, charset_for_labels, fold_case
from errors import CaptchaError
from preprocess import ImageReadError, PreprocessOptions, finish_canvas, load_canvas, read_image

CASES = ("auto", "keep", "lower", "upper")


def decide_case(labels, case="auto"):
    """--case as a run applies it: auto folds to the one case that every label's letters are typed in
    (a site that ignores case, labelled in one), and keeps mixed-case labels as they are."""
    if case not in CASES:
        raise CaptchaError(f"unknown --case {case!r}; choose from {', '.join(CASES)}")
    if case != "auto":
        return case
    letters = "".join(c for label in labels for c in label if c.isalpha())
    if letters and letters == letters.lower() and letters != letters.upper():
        return "lower"
    if letters and letters == letters.upper() and letters != letters.lower():
        return "upper"
    return "keep"


@dataclass
class ScanResult:
    samples: list  # (path, label) pairs that passed every check, labels case-folded
    skipped: dict = field(default_factory=dict)  # reason -> [paths]
    source: label_sources.LabelSource = label_sources.LabelSource("name")
    decision: str = ""  # how the labels were read (printed)
    case: str = "keep"  # the fold applied to the labels
    sizes: list = field(default_factory=list)  # (width, height) of each usable image, when verified
    saturations: list = field(default_factory=list)  # each usable image's colour_saturation, when asked (channels 0)
    asked: dict = field(default_factory=dict)  # path -> the colour its captcha asks for (a labels file's colour column)

    def summary(self):
        counts = ", ".join(f"{len(paths)} {reason}" for reason, paths in sorted(self.skipped.items()))
        return f"{len(self.samples)} usable images" + (f"; skipped {counts}" if counts else "")

    def median_aspect(self):
        """The images' median width / height (None when the scan did not decode them)."""
        return statistics.median(w / h for w, h in self.sizes) if self.sizes else None

    def channels(self):
        """--channels auto: 3 (colour) when the median image carries colour, else 1 (gray); None when the
        scan did not measure colour. Returns (channels, the line that says why)."""
        if self.asked:  # the asked colour is told apart by its hue: gray would drop the one thing that matters
            return 3, ("channels: colour (3), since each image is read with the colour it asks for (the labels "
                       "file's colour column); set it with --channels 1 or 3")
        if not self.saturations:
            return None, ""
        median = statistics.median(self.saturations)
        colourful = sum(s >= COLOUR_SATURATION for s in self.saturations)
        channels = 3 if median >= COLOUR_SATURATION else 1
        return channels, (f"channels: {'colour (3)' if channels == 3 else 'gray (1)'}, decided from the images: "
                          f"{colourful} of {len(self.saturations)} carry colour in their strokes or background "
                          f"(median {median:.0f}, colour from {COLOUR_SATURATION}); set it with --channels 1 or 3")

    def skipped_lines(self):
        return [f"skipped ({reason}): {path}" for reason, paths in sorted(self.skipped.items()) for path in paths]


# An image carries colour when a tenth of its pixels are at least this saturated (HSV, 0-255), or when its strokes
# are: gray images, JPEG-compressed ones included, stay near 0, while coloured ink or clutter is well above it.
COLOUR_SATURATION = 50
MIN_INK_PIXELS = 20  # fewer pixels apart from the background than this: no strokes to measure


def colour_saturation(image):
    """How much colour a colour (H, W, 3) image carries, 0-255: the larger of the 90th percentile of its HSV
    saturation (colour over much of the image: a background, clutter) and the median chroma of its strokes (the
    pixels far from the border's median colour). Thin coloured strokes on a light background are a small share of
    the pixels, so the percentile alone calls them gray; chroma (the spread of B, G, R) rather than HSV saturation,
    which is large for any dark pixel with a little noise in it."""
    overall = float(np.percentile(cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 1], 90))
    pixels = image.reshape(-1, 3).astype(np.int16)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.int16)
    distance = np.abs(pixels - np.median(border, axis=0)).max(axis=1)
    ink = pixels[distance >= 60]
    if len(ink) < MIN_INK_PIXELS:
        return overall
    return max(overall, float(np.median(ink.max(axis=1) - ink.min(axis=1))))


def _inspect(path, channels):
    """(problem, (width, height), colour_saturation or None): channels 0 reads in colour and measures it."""
    try:
        image = read_image(path, channels or 3)
    except ImageReadError as e:
        return e.reason, None, None
    return None, (image.shape[1], image.shape[0]), colour_saturation(image) if not channels else None


def scan_folder(folder, charset=None, max_len=None, labels=label_sources.LabelSource.given(), case="keep", channels=1,
                verify=True, workers=4):
    """Find labelled captchas in `folder`, skipping (and counting by reason) those that can't train.

    Labels are read as `labels` says (a LabelSource: the flags' LabelSource.given, or a resumed run's stored
    one; labels.find_labels_as). case: keep, lower, upper, or auto (labels.decide_case). charset=None accepts any
    symbols; max_len=None accepts any length. verify=True decodes every image once, so a corrupt file is
    reported here rather than crashing a training epoch, and records its size; with channels=0 (--channels
    auto) also its colour (ScanResult.channels decides).
    """
    found = label_sources.find_labels_as(folder, labels)
    case = decide_case([label for _, label in found.samples], case)
    skipped = {reason: list(paths) for reason, paths in found.skipped.items()}
    candidates = []
    for path, label in found.samples:
        label = fold_case(label, case)
        if charset is not None and charset.unknown_symbols(label):
            reason = "symbols outside the charset"
        elif max_len is not None and len(label) > max_len:
            reason = f"labels longer than {max_len}"
        else:
            candidates.append((path, label))
            continue
        skipped.setdefault(reason, []).append(path)
    if verify and candidates:
        with ThreadPoolExecutor(workers) as pool:  # OpenCV decodes outside the GIL
            checked = list(pool.map(lambda p: _inspect(p, channels), [p for p, _ in candidates]))
    else:
        checked = [(None, None, None)] * len(candidates)
    samples, sizes, saturations = [], [], []
    asked = found.asked
    for (path, label), (problem, size, saturation) in zip(candidates, checked):
        if problem:
            skipped.setdefault(problem, []).append(path)
        else:
            samples.append((path, label))
            if size:
                sizes.append(size)
            if saturation is not None:
                saturations.append(saturation)
    return ScanResult(samples, skipped, found.source, found.decision, case, sizes, saturations,
                      {path: asked[path] for path, _ in samples if path in asked})


def split_samples(samples, val_fraction=0.1, test_fraction=0.1, seed=42):
    """Fixed-seed train/val/test split (scikit-learn) by label: every image of a label (`aB3xQ.png`,
    `aB3xQ_1.png`) lands on the same side, so the test split never holds a copy of a training image.
    Each part keeps at least one label."""
    from sklearn.model_selection import train_test_split

    labels = sorted({label for _, label in samples})
    if len(labels) < 3:
        raise CaptchaError(f"need at least 3 different labels to split train/val/test, found {len(labels)}")
    n_test = max(1, round(len(labels) * test_fraction))
    n_val = max(1, round(len(labels) * val_fraction))
    rest, test = train_test_split(labels, test_size=n_test, random_state=seed)
    train, val = train_test_split(rest, test_size=n_val, random_state=seed)
    part_of = {label: part for part, chosen in enumerate([train, val, test]) for label in chosen}
    return tuple([s for s in samples if part_of[s[1]] == part] for part in range(3))


def split_in_two(samples, seed=42):
    """A check folder's images: half validation, half test, by label as split_samples splits (seeded)."""
    from sklearn.model_selection import train_test_split

    labels = sorted({label for _, label in samples})
    if len(labels) < 2:
        raise CaptchaError(f"need at least 2 different labels to split validation/test, found {len(labels)}")
    val, _ = train_test_split(labels, test_size=len(labels) // 2, random_state=seed)
    val = set(val)
    return [s for s in samples if s[1] in val], [s for s in samples if s[1] not in val]


def encode_labels(labels, charset, max_len):
    """Labels -> int32 (batch, max_len), padded with PAD_LABEL."""
    rows = np.full((len(labels), max_len), PAD_LABEL, dtype=np.int32)
    for i, label in enumerate(labels):
        indices = charset.encode(label)
        rows[i, : len(indices)] = indices
    return rows


CACHE_MB = 768  # canvases of a run's images are kept in memory up to this many MiB; above it they stream from disk


def canvas_bytes(count, options):
    canvas = options.canvas
    return count * canvas.height * canvas.width * canvas.channels


def fill_canvases(paths, options, workers=2):
    """Every image's 8-bit canvas (preprocess.make_canvas), read once on `workers` threads (OpenCV
    decodes and resizes outside the GIL): (count, height, width[, 3]) uint8."""
    canvas = options.canvas
    shape = (len(paths), canvas.height, canvas.width) + ((3,) if canvas.channels == 3 else ())
    canvases = np.empty(shape, dtype=np.uint8)

    def fill(i):
        canvases[i] = load_canvas(paths[i], options)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(fill, range(len(paths))))
    return canvases


@dataclass(frozen=True)
class Batching:
    """How a split's images become batches (CaptchaBatches below says what each does). Training batches are
    shuffled, altered and repeated; `for_reading()` is the same pixels as they are, in order, for validation and
    test."""

    options: PreprocessOptions = PreprocessOptions()  # the pixels: canvas, channels, resize, CLAHE
    batch_size: int = 64
    shuffle: bool = False
    seed: int = 0
    augment: str = "none"
    repeats: int = 1
    epoch_steps: int | None = None
    augment_epochs: int | None = None
    asked: dict | None = None  # path -> the colour its captcha asks for, for a model that reads one (its canvas's colours)

    def for_reading(self):
        return dataclasses.replace(self, shuffle=False, augment="none", repeats=1, epoch_steps=None,
                                   augment_epochs=None)


@dataclass(frozen=True)
class Loading:
    """Who makes the batches and from where: `workers` threads, `processes` worker processes for the training
    batches (0: the threads), the canvases kept in memory when the splits' fit in `cache_mb` MiB."""

    workers: int = 2
    processes: int = 0
    cache_mb: int = CACHE_MB


class CaptchaBatches:
    """(images, labels) batches of a split, from canvases kept in memory or streamed from disk.

    Built by `make_batches` as a CaptchaPyDataset (the same with keras.utils.PyDataset mixed in), so Keras can
    prefetch batches on worker threads while the model trains. The decoded, resized 8-bit canvases (preprocess.make_canvas)
    are the same every epoch: with `canvases` (fill_canvases) they are read from memory, else from
    disk each time; either way an item is preprocess.finish_canvas of its canvas, the same functions
    in the same order as a reader's, so the pixels are identical.
    With `augment` ("light", "strong"; training only) each image is altered by augment.augment with a
    generator drawn from (seed, epoch, position in the epoch), and a shuffled epoch's order is drawn
    from (seed, epoch): different every epoch, the same in every rerun and after a resume, whichever
    worker loads it. `repeats` > 1 passes over the samples that many times per epoch (each pass
    altered anew), so a small folder's epoch is long enough that validation and checkpoints stay a
    small part of it. `epoch_steps` instead makes every epoch that many batches, taken in turn from an
    endless run of passes, each shuffled and altered from (seed, pass): a run whose length follows its
    validation checks it every `epoch_steps` steps, whatever the folder's size. `augment_epochs`: only
    the epochs before this one are altered (None: every epoch); the epoch is the loader's own count, so
    prefetching workers and a resumed run agree on it.
    """

    def __init__(self, samples, charset, max_len, batching=Batching(), canvases=None, processes=None,
                 **pydataset_kwargs):
        """batching: a Batching; processes: a WorkerProcesses that makes the batches (None: this process makes
        them)."""
        super().__init__(**pydataset_kwargs)
        self.processes = processes
        if batching.augment not in augment_module.CHOICES:
            raise CaptchaError(f"unknown augmentation {batching.augment!r}; choose from "
                               f"{', '.join(augment_module.CHOICES)}")
        self.augment = batching.augment
        self.augment_epochs = batching.augment_epochs  # a run that follows validation sets it when its anneal starts
        self.seed = batching.seed
        self.paths = [p for p, _ in samples]
        self.labels = encode_labels([label for _, label in samples], charset, max_len)
        self.options = batching.options
        self.asked = [(batching.asked or {}).get(path) for path in self.paths]  # each image's asked colour, or None
        self.batch_size = batching.batch_size
        self.shuffle = batching.shuffle
        self.repeats = batching.repeats
        self.epoch_steps = batching.epoch_steps
        self.canvases = canvases
        self.epoch = 0  # on_epoch_end counts it; a resumed run sets it to the epochs already done

    @property
    def epoch(self):
        return self._epoch

    @epoch.setter
    def epoch(self, value):
        """The epoch decides the order (and the augmentation): setting it is all a resume needs."""
        self._epoch = value
        self.order = np.tile(np.arange(len(self.paths)), self.repeats)
        if self.shuffle:
            np.random.default_rng([self.seed, value]).shuffle(self.order)

    def __len__(self):
        return self.epoch_steps or math.ceil(len(self.order) / self.batch_size)

    def pass_order(self, number):
        """With `epoch_steps`: the order of the images in pass `number` of the endless run."""
        order = np.arange(len(self.paths))
        if self.shuffle:
            np.random.default_rng([self.seed, number]).shuffle(order)
        return order

    def canvas(self, i):
        return self.canvases[i] if self.canvases is not None else load_canvas(self.paths[i], self.options)

    def __getitem__(self, index):
        if self.processes is not None:  # made by a worker process, for this epoch
            return self.processes.batch(self.epoch, index, self.augment_epochs)
        return self.make_batch(index)

    def make_batch(self, index):
        order, draw = self.order, self.epoch  # what orders the batch, and what its augmentation is drawn from
        if self.epoch_steps:  # batch `index` of this epoch is batch `index` of some pass of the endless run
            draw, index = divmod(self.epoch * self.epoch_steps + index, math.ceil(len(self.paths) / self.batch_size))
            order = self.pass_order(draw)
        start = index * self.batch_size
        rows = order[start : start + self.batch_size]
        images = np.stack([finish_canvas(self.canvas(i), self.options, augmentation=self._augmentation(draw, start + k),
                                         asked=self.asked[i]) for k, i in enumerate(rows)])
        return images, self.labels[rows]

    def _augmentation(self, draw, position):
        if self.augment == "none" or (self.augment_epochs is not None and self.epoch >= self.augment_epochs):
            return None
        rng = np.random.default_rng([self.seed, draw, position])
        return lambda image: augment_module.augment(image, self.augment, rng)

    def on_epoch_end(self):
        self.epoch += 1

    def close(self):
        """Stops the worker processes, if any (threads need nothing)."""
        if self.processes is not None:
            self.processes.close()
            self.processes = None


class WorkerProcesses:
    """Batches of a CaptchaBatches made in `count` worker processes, each holding its own copy of the
    loader's settings, reading the canvases from one block of shared memory and writing each batch's
    images into a slot of another (a pickled batch of 256 images is 10 MB through a pipe; a slot
    needs no copy on the way).

    The processes start from a forkserver (never a fork of a process whose TensorFlow or JAX runtime
    has started) and ignore Ctrl-C and SIGTERM, which the training process handles: it stops between
    steps and then closes them. A batch depends on (seed, epoch, index) alone, so it is the same
    whichever process makes it, and the same as a thread makes it. `slots`: the batches that may be
    in the making at once (one per loader thread)."""

    def __init__(self, samples, charset, max_len, batching, canvases, count, slots):
        options = batching.options
        slot_shape = (slots, batching.batch_size, *options.canvas.shape)
        slot_bytes = int(np.prod(slot_shape)) * np.dtype(np.float32).itemsize
        check_shared_memory((canvases.nbytes if canvases is not None else 0) + slot_bytes)
        self.memory = None
        shape = None
        if canvases is not None:
            self.memory = shared_memory.SharedMemory(create=True, size=max(1, canvases.nbytes))
            np.ndarray(canvases.shape, np.uint8, self.memory.buf)[:] = canvases
            shape = canvases.shape
        self.out_memory = shared_memory.SharedMemory(create=True, size=slot_bytes)
        self.out = np.ndarray(slot_shape, np.float32, self.out_memory.buf)
        self.free_slots = queue.SimpleQueue()
        for slot in range(slots):
            self.free_slots.put(slot)
        self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("forkserver"),
                                        initializer=_start_worker,
                                        initargs=(samples, charset, max_len, batching,
                                                  self.memory.name if self.memory else None, shape,
                                                  self.out_memory.name, slot_shape))

    def batch(self, epoch, index, augment_epochs):
        slot = self.free_slots.get()  # waits while every slot holds a batch in the making
        try:
            count, labels = self.pool.submit(_worker_batch, epoch, index, augment_epochs, slot).result()
            return self.out[slot, :count].copy(), labels
        finally:
            self.free_slots.put(slot)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.out = None  # the view of the slots goes first: a buffer with a view on it cannot close
        for memory in (self.memory, self.out_memory):
            if memory is not None:
                memory.close()
                memory.unlink()
        self.memory = self.out_memory = None


def check_shared_memory(needed, folder="/dev/shm"):
    """Refuses worker processes that would need more shared memory than the system has free: on Linux a
    write past a full /dev/shm (64 MiB in a default Docker container) kills the process with SIGBUS."""
    if not os.path.isdir(folder):
        return
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CaptchaError(f"--processes: the worker processes need {needed / 2**20:.0f} MiB of shared memory and "
                           f"{folder} has {free / 2**20:.0f} MiB free; give it more (docker run --shm-size=4g), "
                           f"lower --cache_mb or --batch_size, or use threads (--processes 0)")


_WORKER = {}  # in a worker process: its CaptchaBatches, the shared memory it reads, and the slots it writes


def _start_worker(samples, charset, max_len, batching, memory_name, shape, out_name, slot_shape):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the training process decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cv2.setNumThreads(1)
    canvases = None
    if memory_name:
        memory = shared_memory.SharedMemory(name=memory_name)  # the training process owns and unlinks it
        canvases = np.ndarray(shape, np.uint8, memory.buf)
        _WORKER["memory"] = memory
    _WORKER["out_memory"] = shared_memory.SharedMemory(name=out_name)
    _WORKER["out"] = np.ndarray(slot_shape, np.float32, _WORKER["out_memory"].buf)
    _WORKER["batches"] = CaptchaBatches(samples, charset, max_len, batching, canvases)


def _worker_batch(epoch, index, augment_epochs, slot):
    """Writes batch `index` of `epoch` into `slot`; returns its image count and its labels. `augment_epochs` as the
    training process has it now (a run whose length follows validation decides it as it goes)."""
    batches = _WORKER["batches"]
    batches.augment_epochs = augment_epochs
    if batches.epoch != epoch:
        batches.epoch = epoch
    images, labels = batches.make_batch(index)
    _WORKER["out"][slot, : len(images)] = images
    return len(images), labels


def make_batches(samples, charset, max_len, batching=Batching(), *, workers=2, in_memory=False, processes=0):
    """A CaptchaBatches (`batching`: a Batching) that is also a keras.utils.PyDataset (prefetched on `workers`
    threads). in_memory=True reads every canvas once, now (fill_canvases), and keeps them. processes > 0: the
    threads hand each batch to one of that many worker processes (WorkerProcesses); call close() when done
    with it."""
    # Each loader thread runs its own OpenCV calls; OpenCV's own thread pool inside each would only
    # oversubscribe the cores that the training step also needs.
    cv2.setNumThreads(1)
    canvases = fill_canvases([p for p, _ in samples], batching.options, workers) if in_memory and samples else None
    made_by = WorkerProcesses(samples, charset, max_len, batching, canvases, processes,
                              slots=max(workers, processes)) if processes else None
    return pydataset_class()(samples, charset, max_len, batching, canvases, made_by, workers=max(workers, processes),
                             use_multiprocessing=False)


@functools.cache
def pydataset_class():
    """CaptchaBatches mixed with keras.utils.PyDataset, defined once. Keras is imported here, not at the top:
    `synth.py` and `dataset.py scan` start without TensorFlow."""
    import keras

    class CaptchaPyDataset(CaptchaBatches, keras.utils.PyDataset):
        """CaptchaBatches that Keras prefetches on worker threads."""

    return CaptchaPyDataset


def split_batches(splits, charset, max_len, batching, loading=Loading()):
    """Batches of the three splits (train, val, test): the training ones as `batching` says (shuffled, augmented
    the epochs before its `augment_epochs`, repeated or drawn `epoch_steps` an epoch), validation and test as
    `batching.for_reading()`: the plain pipeline's pixels, the same ones test.py reads. The canvases are read once
    into memory when all three splits' fit in `loading.cache_mb` MiB; else every epoch streams them from disk.
    Only the training batches are made by `loading.processes` worker processes, if any."""
    size = canvas_bytes(sum(len(split) for split in splits), batching.options)
    in_memory = size <= loading.cache_mb * 2**20
    started = time.perf_counter()
    train_set, val_set, test_set = splits
    made = (make_batches(train_set, charset, max_len, batching, workers=loading.workers, in_memory=in_memory,
                         processes=loading.processes),
            *(make_batches(split, charset, max_len, batching.for_reading(), workers=loading.workers,
                           in_memory=in_memory) for split in (val_set, test_set)))
    print(f"canvases: {size / 2**20:.0f} MiB, " + (f"read into memory in {time.perf_counter() - started:.1f} s"
                                                    if in_memory else f"over --cache_mb {loading.cache_mb}: read from "
                                                                      f"disk every epoch"))
    return made


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check a folder before training: how its labels are read, "
                                                 "its usable and skipped images.")
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="count the usable and skipped images of a folder")
    scan.add_argument("folder")
    label_sources.add_label_flags(scan, unset="auto", unset_means="auto, as train.py")
    scan.add_argument("--case", default="auto", choices=CASES, help="fold the labels' letter case")
    scan.add_argument("--charset", default="auto", help="auto (the symbols the labels use, as train.py), a "
                                                        "preset (default, digits, ...) or the symbols")
    scan.add_argument("--max_len", type=int, default=0, help="longest label accepted (0: any)")
    scan.add_argument("--verbose", action="store_true", help="list every skipped file")
    args = parser.parse_args(argv)
    try:
        fixed = None if args.charset == "auto" else charset_for_labels(args.charset, [])
        result = scan_folder(args.folder, fixed, args.max_len or None,
                             label_sources.LabelSource.given(args.labels_from, args.labels, args.label_spaces),
                             case=args.case, channels=0)
    except CaptchaError as e:
        return cli.user_error(e)
    if result.decision:
        print(result.decision)
    print(result.summary())
    if result.samples:
        charset = charset_for_labels(args.charset, [label for _, label in result.samples])
        print(f"charset: {len(charset.symbols)} symbols {charset.symbols!r}; labels up to "
              f"{max(len(label) for _, label in result.samples)} characters; letter case: {result.case}")
        print(result.channels()[1])
    if args.verbose:
        print("\n".join(result.skipped_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
