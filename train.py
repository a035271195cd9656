"""Train the CRNN + CTC captcha reader.

    python train.py                         # built-in synthetic data (drawn once into data/synth)
    python train.py --data_dir path/to/imgs # your folder: labels from the file names (4721.png, 4721_md5.png, ...)
    python train.py --data_dir imgs --labels labels.csv   # numbered files and a labels file
    python train.py --preset fast --epochs 10 --batch_size 32

Every field of TrainConfig below is a command-line flag. Writes into --out (default saved_model/):
crnn_ctc_best.keras (best validation CER), crnn_ctc_final.keras (last epoch), train_log.csv
(one row per epoch), metrics.json (the best model on the held-out test split) and three plots
(training_curves.png, predictions.png, confusions.png). While it runs,
crnn_ctc_resume.keras lets `python train.py --resume` continue after a crash, a kill or Ctrl-C.
"""

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

import augment
import dataset
import labels as label_sources
import metrics
import model
import plots
import preprocess
import reader
import synth
from preprocess import CaptchaError, Charset, PreprocessOptions

BEST_NAME = "crnn_ctc_best.keras"
FINAL_NAME = "crnn_ctc_final.keras"
RESUME_NAME = "crnn_ctc_resume.keras"  # after every epoch: weights, optimizer state, where training stands
LOG_NAME = "train_log.csv"
DEFAULT_EPOCHS = 30  # passes over the training images with --epochs 0; small folders get more (--min_steps)
MIN_EPOCH_STEPS = 50  # with --epochs 0, a small folder's epoch passes over its images more than once
BASE_MODEL = Path(__file__).resolve().parent / "pretrained" / "base.keras"  # --init_from base
BASE_PRESET = "fast"  # the network of the base model
CPU_BUILTIN_STEPS = 3000  # on a CPU, `python train.py` on the built-in data makes about this many steps
MAX_AUTO_WIDTH = 800  # --width 0 widens the canvas for wide captchas up to this


@dataclass
class TrainConfig:
    data_dir: str = ""  # folder of labelled images; empty: the built-in synthetic set
    synth_dir: str = "data/synth"  # the built-in set is drawn (once) into synth_dir/synth_style
    synth_style: str = "captcha"  # captcha (the `captcha` package), gregwar (like the Kaggle set) or hershey
    synth_count: int = 20000
    synth_seed: int = 1234
    init_from: str = "base"  # start from: base (the shipped pretrained model, for the fast preset and default
    #                          recipe), none (from scratch), or a .keras file; output rows are carried by symbol
    freeze_cnn_epochs: int = 0  # with init_from: train only the recurrent part and the output for this many epochs
    preset: str = "auto"  # the network (model.PRESETS): seed (the reference's), fast, kerasio, tiny (tests); auto: fast
    labels_from: str = "auto"  # where file names hold the label: auto (decided from all the names, refused when
    #                            unclear), name, prefix (LABEL_md5.png), suffix (ID_LABEL.png) or regex:PATTERN
    labels: str = ""  # a labels file instead: CSV/TSV file,label rows, a JSON or Python dict, or one label per line
    case: str = "auto"  # letter case of the labels: keep, lower, upper (folded), auto (labels typed in one case
    #                     are folded to it, for sites that ignore case; mixed-case labels kept)
    charset: str = "auto"  # auto: the symbols the labels use; or a preset (default, digits, ...) or the symbols
    max_len: int = 0  # longest label; 0: the longest in the data
    channels: int = 1  # 1: gray; 3: colour (text and clutter of different colours); the base model's first
    #                    convolution is widened to colour
    height: int = 0  # the canvas images are resized and padded to; 0: the network's (50, or the start model's)
    width: int = 0  # 0: the network's (200), or wider for a folder whose median image is wider than the canvas
    limit: int = 0  # use at most this many images (0: all)
    recipe: str = "default"  # optimizer and schedule: default (AdamW, one-cycle), reference, kerasio (model.RECIPES)
    epochs: int = 0  # 0: 30, or more on a small folder so that training makes at least --min_steps updates
    min_steps: int = 3000  # with --epochs 0: the fewest optimizer steps (batches) a run makes
    augment: str = "recipe"  # on-the-fly training augmentation: none, light, strong; recipe: the recipe's
    clean_finish: float = -1.0  # the last fraction of the epochs without augmentation; -1: the recipe's (0.25)
    ema_momentum: float = -1.0  # evaluate and save a moving average of the weights, e.g. 0.995 (0: off; -1: the
    #                             recipe's, off for all three)
    batch_size: int = 0  # 0: the recipe's
    learning_rate: float = 0.0  # 0: the recipe's (the peak, for one-cycle)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42  # split, shuffling and weight initialisation
    settle_epochs: int = -1  # end once the validation CER has held this many epochs (0: never; -1: the recipe's,
    #                          10 for default, never for reference and kerasio)
    patience: int = 8  # epochs without a better validation score before stopping (not one-cycle runs; the recipe's
    #                    may differ)
    auto_crop: bool = False
    force_invert: bool = False
    strong: bool = False
    cache_mb: int = dataset.CACHE_MB  # the images' decoded, resized canvases are kept in memory when they fit in
    #                                   this many MiB (read once); above it they are read from disk every epoch
    workers: int = 2  # threads that read and preprocess batches
    processes: int = 0  # worker processes that make the training batches (0: the threads make them); for machines
    #                     with many cores feeding a GPU
    strategy: str = "auto"  # mirrored: tf.distribute.MirroredStrategy over all GPUs (batch_size is the global batch);
    #                         auto: mirrored when there are 2+ GPUs; none: one device
    out: str = "saved_model"
    resume: bool = False  # continue the interrupted run in --out, with its own settings
    verbose: bool = False  # list every skipped file


def field_comments(cls):
    """Each field's comment in the class's source (a field's line and the comment lines under it): its --help."""
    import inspect
    import re

    comments, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"\s+(\w+): \w+ = [^#]*(?:#\s*(.*))?$", line)
        if field:
            name = field.group(1)
            comments[name] = field.group(2) or ""
        elif name and re.match(r"\s+#", line):
            comments[name] += " " + line.strip().lstrip("#").strip()
        else:
            name = None
    return comments


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        help_text = f"{comments.get(f.name, '')} (default: {f.default!r})".strip().replace("%", "%%")
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=f.type, default=f.default, help=help_text)
    return TrainConfig(**vars(parser.parse_args(argv)))


def resolve_data(cfg):
    """The folder to train on: the user's, or the built-in synthetic set (drawn on first use)."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    folder = Path(cfg.synth_dir) / cfg.synth_style
    have = len(preprocess.list_images(folder)) if folder.is_dir() else 0
    if have < cfg.synth_count:
        print(f"drawing {cfg.synth_count - have} synthetic captchas into {folder} (cached for later runs)")
        synth.generate_synthetic(folder, cfg.synth_count - have, seed=cfg.synth_seed + have,
                                      style=cfg.synth_style)
    return folder


def make_strategy(name, gpu_count):
    """TensorFlow's MirroredStrategy over every GPU (over the logical CPUs when there is no GPU), or None.

    Keras splits each global batch across the replicas and sums their gradients. Multi-machine
    training (MultiWorkerMirroredStrategy) is not offered: Keras 3's fit() fails under it
    (keras-team/keras#20585).
    """
    if name not in ("auto", "mirrored", "none"):
        raise CaptchaError(f"unknown --strategy {name!r}; choose from auto, mirrored, none")
    if name == "none" or (name == "auto" and gpu_count < 2):
        return None
    if keras.backend.backend() != "tensorflow":
        raise CaptchaError(f"--strategy {name} needs the TensorFlow backend (this is {keras.backend.backend()})")
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def load_dataset(cfg, folder, source=None):
    """Scan (labels read by --labels_from / --labels, or by a resumed run's stored `source`), pick charset
    and label length, split. Returns (charset, max_len, train, val, test, scan)."""
    fixed_charset = None if cfg.charset == "auto" else preprocess.charset_from_arg(cfg.charset)
    if cfg.channels not in preprocess.CHANNELS:
        raise CaptchaError(f"--channels {cfg.channels}: 1 (gray) or 3 (colour)")
    scan = dataset.scan_folder(folder, fixed_charset, cfg.max_len or None, labels_from=cfg.labels_from,
                               labels_file=cfg.labels or None, case=cfg.case, source=source, channels=cfg.channels)
    if scan.decision:
        print(scan.decision)
    print(f"{folder}: {scan.summary()}")
    if cfg.verbose and scan.skipped:
        print("\n".join(scan.skipped_lines()))
    if not scan.samples:
        raise CaptchaError(f"{folder}: no usable labelled images ({scan.summary()})")
    samples = scan.samples
    if cfg.limit:
        samples = [samples[i] for i in np.random.default_rng(cfg.seed).permutation(len(samples))[: cfg.limit]]
    labels = [label for _, label in samples]
    charset = preprocess.charset_for_labels(cfg.charset, labels)
    max_len = cfg.max_len or max(len(label) for label in labels)
    train, val, test = dataset.split_samples(samples, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    print(f"charset: {len(charset.symbols)} symbols + blank; labels up to {max_len} characters; letter case: "
          f"{scan.case}" + (" (folded)" if scan.case != "keep" else "")
          + f"; split {len(train)} train / {len(val)} val / {len(test)} test")
    return charset, max_len, train, val, test, scan


def resolve_init_from(cfg):
    """The model file to start from, or None to train from scratch. The shipped base model is a `fast`
    network trained with the default recipe: it is the start only for runs of that network and recipe."""
    if cfg.init_from in ("", "none"):
        return None
    if cfg.init_from != "base":
        return Path(cfg.init_from)
    if cfg.preset != BASE_PRESET or cfg.recipe != "default":
        print(f"--init_from base: not used, the base model is a '{BASE_PRESET}' network for the default recipe "
              f"(this run: --preset {cfg.preset} --recipe {cfg.recipe}); training from scratch")
        return None
    if not BASE_MODEL.exists():
        raise CaptchaError(f"{BASE_MODEL}: the base model is missing from this checkout; rebuild it (see "
                           f"{BASE_MODEL.parent / 'README.md'}) or pass --init_from none")
    return BASE_MODEL


def make_split_batches(cfg, train_set, val_set, test_set, charset, max_len, options, batch_size, augmentation,
                       repeats=1, augment_epochs=None):
    """Batches of the three splits. Only the training batches are shuffled, augmented (the epochs before
    `augment_epochs`, None: all) and repeated: validation and test read the plain pipeline's pixels, the
    same ones test.py reads. The images' canvases are read once into memory when all three splits' fit
    in --cache_mb; else every epoch streams them from disk."""
    size = dataset.canvas_bytes(len(train_set) + len(val_set) + len(test_set), options)
    in_memory = size <= cfg.cache_mb * 2**20
    started = time.perf_counter()

    def batches(samples, training):
        return dataset.make_batches(samples, charset, max_len, options, batch_size, training, cfg.seed, cfg.workers,
                                    augmentation if training else "none", repeats if training else 1,
                                    augment_epochs if training else None, in_memory=in_memory,
                                    processes=cfg.processes if training else 0)

    made = batches(train_set, True), batches(val_set, False), batches(test_set, False)
    print(f"canvases: {size / 2**20:.0f} MiB, " + (f"read into memory in {time.perf_counter() - started:.1f} s"
                                                    if in_memory else f"over --cache_mb {cfg.cache_mb}: read from "
                                                                      f"disk every epoch"))
    return made


def plan_epochs(epochs, min_steps, train_images, batch_size):
    """(epochs, passes over the training images per epoch). --epochs when given, one pass each. Else
    DEFAULT_EPOCHS passes, or more when that makes fewer than `min_steps` optimizer steps: a few hundred
    images need many passes. A small folder's epoch holds several passes, so that it has at least
    MIN_EPOCH_STEPS steps and validation and checkpoints stay a small part of it."""
    if epochs:
        return epochs, 1
    repeats = math.ceil(MIN_EPOCH_STEPS / math.ceil(train_images / batch_size))
    steps_per_epoch = math.ceil(train_images * repeats / batch_size)  # as the loader batches them
    return max(math.ceil(DEFAULT_EPOCHS / repeats), math.ceil(min_steps / steps_per_epoch)), repeats


def cpu_builtin_epochs(images_per_epoch, batch_size):
    """Epochs of the built-in run on a CPU: about CPU_BUILTIN_STEPS steps, at least one epoch."""
    return max(1, round(CPU_BUILTIN_STEPS / math.ceil(images_per_epoch / batch_size)))


def early_stopping(recipe, patience):
    """Stops on the recipe's monitor; None for a one-cycle run, which runs its whole schedule unless its
    validation settles (StopWhenSettled): its low-rate end is where it sharpens, and validation that has
    stalled at the rate's peak says nothing about it (tjsp5, stopped at epoch 36 of 54 while the rate
    was still high: test exact match 0.9462 with the best checkpoint, 0.9686 with the model at the stop;
    the whole schedule read 0.9731)."""
    if recipe.schedule == "onecycle":
        return None
    return keras.callbacks.EarlyStopping(monitor=recipe.monitor, mode="min", patience=recipe.stop_patience or patience,
                                         restore_best_weights=recipe.restore_best, verbose=1)


def resolve_canvas(cfg, config, median_aspect, start_model=None):
    """The network's settings with this run's canvas (--height, --width) and --channels. With --width 0 the
    canvas widens for a folder whose median image is wider than it, so that the text keeps every row."""
    stride = model.width_stride(config)
    height, width = cfg.height or config.height, cfg.width or config.width
    if not cfg.width and median_aspect and height * median_aspect > width:
        width = min(MAX_AUTO_WIDTH, math.ceil(height * median_aspect / stride) * stride)
        print(f"canvas: {width}x{height}, widened for the folder's median image ({median_aspect:.2f}:1, wider than "
              f"{config.width}x{config.height}); set it with --width")
    if width % stride or height < 8:
        raise CaptchaError(f"--width {width} --height {height}: the width must be a multiple of {stride} (input "
                           f"columns per time step) and the height at least 8")
    if start_model and config.collapse == "flatten" and height != config.height:
        raise CaptchaError(f"--height {height}: the start model {start_model} reads {config.height}-row images (its "
                           f"layers after the convolutions depend on the height); use --height {config.height}, "
                           f"or --init_from none")
    return dataclasses.replace(config, height=height, width=width, channels=cfg.channels)


def check_time_steps(steps, max_len, height=None, width=None, median_aspect=None):
    """CTC needs at least one output step per character (and one more between each repeated pair). The
    steps counted are those the text spans: an image narrower than the canvas is padded at its sides."""
    spanned = steps
    if median_aspect and height and width:
        spanned = math.floor(steps * min(1.0, height * median_aspect / width))
    where = f" (the folder's median image fills {spanned} of the {steps} time steps)" if spanned < steps else ""
    if spanned < max_len:
        raise CaptchaError(f"the text spans {spanned} time steps{where} but labels have up to {max_len} characters; "
                           f"use a larger canvas (--width, and --height with --init_from none) or shorter labels")
    if spanned < 2 * max_len - 1:
        print(f"warning: the text spans {spanned} time steps{where} for labels of {max_len}: labels with many "
              f"repeated characters may be unlearnable; a wider --width gives more")


def evaluate(keras_model, batches, charset, labels):
    """Exact match (case-sensitive and not), CER and CTC loss of `keras_model` on every batch of
    `batches`, from one pass of predictions. Returns (scores, predictions, confidences)."""
    predictions, confidences, loss_sum = [], [], 0.0
    ctc = model.CTCLoss(charset.blank_index)
    for i in range(len(batches)):
        images, encoded = batches[i]
        probs = keras_model.predict_on_batch(images)[: len(images)]  # MirroredStrategy may pad a batch for its replicas
        loss_sum += float(keras.ops.convert_to_numpy(ctc(encoded, probs))) * len(images)
        texts, confidence = reader.decode_with_confidence(probs, charset)
        predictions += texts
        confidences += confidence
    return {**metrics.score(predictions, labels), "loss": loss_sum / max(1, len(labels))}, predictions, confidences


class AveragedWeights(keras.callbacks.Callback):
    """The epoch-end callbacks between this one and its partner `self.restore` see the moving average of
    the weights that the optimizer keeps (`use_ema`, recipe field `ema_momentum`) instead of the weights
    as trained: BatchNorm statistics are measured for it, validation reads it and checkpoints save it.
    Then the trained weights are put back, so training goes on from them and a resume checkpoint holds
    them. After the last epoch Keras itself writes the average into the model (fit() finalizes it), so
    the final model is the average too; so does fit() when a run is stopped inside an epoch, so that run
    resumes from the average. Averaging smooths the last steps' noise out of the model that is read (a
    few hundred validation images otherwise pick among noisy epochs)."""

    def __init__(self):
        super().__init__()
        self.trained = None  # the trained weights while the average is in the model
        self.restore = RestoreTrainedWeights(self)

    def on_epoch_end(self, epoch, logs=None):
        weights = self.model.trainable_variables  # the optimizer's average was built in this order
        self.trained = [keras.ops.convert_to_numpy(weight) for weight in weights]
        self.model.optimizer.finalize_variable_values(weights)
        unshare(weights)

    def on_train_end(self, logs=None):  # fit() has just put the average in as it is
        unshare(self.model.trainable_variables)


def unshare(weights):
    """Gives each weight a buffer of its own after `finalize_variable_values`, which assigns the optimizer's
    average variables to the weights as they are. Under JAX a weight and its average then hold one array,
    and the next compiled call, which donates the weights' buffers, deletes the optimizer's copy too (the
    next save of the optimizer failed: "Array has been deleted")."""
    for weight in weights:
        weight.assign(keras.ops.convert_to_numpy(weight))


class RestoreTrainedWeights(keras.callbacks.Callback):
    """AveragedWeights' partner: puts the trained weights back at the epoch's end."""

    def __init__(self, averaged):
        super().__init__()
        self.averaged = averaged

    def on_epoch_end(self, epoch, logs=None):
        for weight, value in zip(self.model.trainable_variables, self.averaged.trained):
            weight.assign(value)
        self.averaged.trained = None


class PreciseBatchNorm(keras.callbacks.Callback):
    """At each epoch's end, before validation and checkpoints: every BatchNormalization layer's inference
    statistics are measured afresh on `batches` training batches at the epoch's final weights ("precise
    BN"). The running averages kept by training mix statistics of weights from earlier steps; at a
    one-cycle peak the weights move so fast that these no longer fit them, and a model that trains well
    reads almost nothing right at inference (tjsp5, 500 images, epoch 4: validation exact match 0.06 with
    the running averages, 0.68 with them recomputed). Layer by layer, in inference mode (each layer's
    inputs as they will be at inference: earlier layers already recomputed, no dropout), with compiled
    predictions. Frozen layers keep theirs."""

    def __init__(self, train_batches, batches):
        super().__init__()
        self.train_batches, self.batches = train_batches, batches
        self.probes = None  # (layer, model from the input to that layer's input), made once per model

    def on_epoch_end(self, epoch, logs=None):
        if self.probes is None:
            self.probes = [(layer, self.moments_probe(layer)) for layer in self.model.layers
                           if isinstance(layer, keras.layers.BatchNormalization)]
        images = [self.train_batches[k][0] for k in range(min(self.batches, len(self.train_batches)))]
        for layer, probe in self.probes:
            if not layer.trainable:
                continue
            means, mean_squares = zip(*(probe.predict_on_batch(batch) for batch in images))
            mean = np.concatenate(means).mean(0, dtype=np.float64)  # every image has as many positions
            variance = np.maximum(np.concatenate(mean_squares).mean(0, dtype=np.float64) - mean * mean, 0.0)
            layer.moving_mean.assign(mean.astype("float32"))
            layer.moving_variance.assign(variance.astype("float32"))

    def moments_probe(self, layer):
        """The model up to `layer`'s input, giving each image's per-channel mean of it and of its square:
        (batch, C) twice."""
        x = layer.input
        positions = [axis for axis in range(1, len(x.shape)) if axis != layer.axis % len(x.shape)]
        return keras.Model(self.model.inputs, [keras.ops.mean(x, axis=positions),
                                               keras.ops.mean(keras.ops.square(x), axis=positions)])


class ValidationMetrics(keras.callbacks.Callback):
    """Adds val_loss, val_exact_match and val_cer to the epoch logs, for the callbacks after it.

    One prediction pass over the validation split gives all three (fit's own validation_data would
    predict it a second time, for the loss alone)."""

    def __init__(self, val_batches, charset, val_labels):
        super().__init__()
        self.val_batches, self.charset, self.val_labels = val_batches, charset, val_labels

    def on_epoch_end(self, epoch, logs=None):
        scores, _, _ = evaluate(self.model, self.val_batches, self.charset, self.val_labels)
        logs["val_loss"] = scores["loss"]
        logs["val_exact_match"] = scores["exact_match"]
        logs["val_cer"] = scores["cer"]
        print(f" - val_loss: {scores['loss']:.4f} - val_exact_match: {scores['exact_match']:.4f} - "
              f"val_cer: {scores['cer']:.4f}")


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model with the lowest `monitor` (val_cer or val_loss), atomically and with its
    metadata (keras.callbacks.ModelCheckpoint can do neither). The CER of a few hundred images often
    ties; a tie goes to the later epoch, which has trained longer at a lower rate (the loss never ties)."""

    def __init__(self, path, meta, monitor="val_cer", best=np.inf):
        super().__init__()
        self.path, self.meta, self.monitor, self.best = path, meta, monitor, best

    def on_epoch_end(self, epoch, logs=None):
        if logs[self.monitor] < self.best or (self.monitor == "val_cer" and logs[self.monitor] == self.best):
            print(f"{self.monitor} {self.best:.4f} -> {logs[self.monitor]:.4f}; saving {self.path}")
            self.best = logs[self.monitor]
            model.save_model(self.model, self.path, self.meta)


class StopWhenSettled(keras.callbacks.Callback):
    """Ends a run whose validation has settled: the same validation CER `epochs` epochs in a row while
    it reads most images (exact match above 0.5). From there the best checkpoint only moves to a later,
    equally good epoch, so the rest of the schedule costs time and buys nothing. (henan4: 7 of 296
    validation images wrong at nearly every epoch from 1 to 40, 26 minutes; this release's default runs on
    tjsp5, captchads4 and hershey never held it for more than 4 epochs.) A CER stuck at the CTC plateau,
    where nothing reads yet, is not settled: that run may still leave it. `history`: (val_cer,
    val_exact_match) of the epochs before a resume."""

    def __init__(self, epochs, history=()):
        super().__init__()
        self.epochs, self.history = epochs, list(history)

    def settled(self):
        last = self.history[-self.epochs:]
        return (len(last) == self.epochs and all(exact > 0.5 for _, exact in last)  # (a CER read back from the log
                and all(round(cer, 9) == round(last[0][0], 9) for cer, _ in last))  # may differ in its last bits)

    def on_epoch_end(self, epoch, logs=None):
        self.history.append((logs["val_cer"], logs["val_exact_match"]))
        if self.settled():
            print(f"validation settled: CER {logs['val_cer']:.4f} for {self.epochs} epochs; stopping after epoch "
                  f"{epoch + 1}")
            self.model.stop_training = True


class EpochClock(keras.callbacks.Callback):
    """Adds to the epoch logs (so train_log.csv has them) the seconds the epoch's steps took and the
    seconds its end took, from the first epoch-end callback to `self.stop` (placed just before the CSV
    logger): precise BatchNorm, validation and the best checkpoint."""

    def __init__(self):
        super().__init__()
        self.stop = _EpochClockStop(self)
        self.begun = self.last_step = self.end_begun = None

    def on_epoch_begin(self, epoch, logs=None):
        self.begun = self.last_step = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.last_step = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.end_begun = time.perf_counter()


class _EpochClockStop(keras.callbacks.Callback):
    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def on_epoch_end(self, epoch, logs=None):
        clock = self.clock
        logs["steps_seconds"] = round(clock.last_step - clock.begun, 3)
        logs["epoch_end_seconds"] = round(time.perf_counter() - clock.end_begun, 3)


class DurationEstimate(keras.callbacks.Callback):
    """After the first steps, the run's expected duration on this device: the time of steps
    `first`-`last` of the first epoch (after compilation), times the steps still planned."""

    def __init__(self, steps_left, first=5, last=25):
        super().__init__()
        self.steps_left, self.first, self.last = steps_left, first, last
        self.started, self.done = None, False

    def on_train_batch_end(self, batch, logs=None):
        if self.done:
            return
        if batch + 1 == self.first:
            self.started = time.perf_counter()
        elif batch + 1 == self.last and self.started is not None:
            seconds = (time.perf_counter() - self.started) / (self.last - self.first)
            print(f"\nexpected: about {seconds * self.steps_left / 60:.0f} min for the {self.steps_left} steps planned "
                  f"on this device ({1000 * seconds:.0f} ms a step over steps {self.first + 1}-{self.last}; "
                  f"validation and checkpoints not counted); Ctrl-C stops and --resume continues")
            self.done = True


class StopBetweenSteps(keras.callbacks.Callback):
    """Ctrl-C or SIGTERM while fit() runs ends the step in flight first, then stops training (a KeyboardInterrupt
    raised here, between steps). Under JAX a step owns the weights while it runs (fit() hands their buffers over to
    it), so an interrupt that landed inside one left nothing to save. Outside fit(), and on a second signal, the
    stop is at once."""

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self):
        self.signal = None  # the signal that asked to stop
        self.in_fit = False

    def request(self, signum):
        """From the signal handler: a first signal during fit() is noted, any other stops now."""
        first = self.signal is None
        self.signal = signum
        if not (self.in_fit and first):
            raise KeyboardInterrupt

    def stop_if_asked(self):
        if self.signal is not None:
            raise KeyboardInterrupt

    def on_train_batch_end(self, batch, logs=None):
        self.stop_if_asked()

    def on_epoch_end(self, epoch, logs=None):  # last callback: the epoch's checkpoints are written by now
        self.stop_if_asked()


STOP = StopBetweenSteps()  # signals reach the one process-wide handler in main(), which hands them to this


class ResumeCheckpoint(keras.callbacks.Callback):
    """After every epoch, saves what `--resume` needs: the model with its optimizer state (learning
    rate included), the epochs done, the best val_cer so far and the run's settings."""

    def __init__(self, path, meta, cfg, best_checkpoint, epochs_done=0):
        super().__init__()
        self.path, self.meta, self.cfg, self.best_checkpoint = path, meta, cfg, best_checkpoint
        self.epochs_done = epochs_done

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_done = epoch + 1
        self.save()

    def save(self, finished=False):
        """finished=True: training is over (all epochs, or stopped early); only scoring is left."""
        state = {"epochs_done": self.epochs_done, "best_score": self.best_checkpoint.best,
                 "config": dataclasses.asdict(self.cfg), "finished": finished}
        model.save_model(self.model, self.path, {**self.meta, "resume": state})


def output_class_sources(source_charset, target_charset):
    """For each output class of the target charset, the class of the source charset that reads the
    same symbol (the blank maps to the blank), or None for a symbol the source never learned."""
    sources = [None] * target_charset.num_classes
    sources[target_charset.blank_index] = source_charset.blank_index
    for symbol in target_charset.symbols:
        if symbol in source_charset.symbols:
            sources[target_charset.encode(symbol)[0]] = source_charset.encode(symbol)[0]
    return sources


def copy_weights_by_symbol(source, source_charset, target, target_charset):
    """Copy every weight of `source` into the same-shaped `target`, layer by layer in order; the
    output layer's rows are carried over by symbol, so a symbol keeps what it learned whatever its
    position in the new charset. Returns the symbols that start fresh."""
    source_layers = [layer for layer in source.layers if layer.weights]
    target_layers = [layer for layer in target.layers if layer.weights]
    if len(source_layers) != len(target_layers):
        raise CaptchaError(f"--init_from model has {len(source_layers)} layers with weights, this one "
                           f"{len(target_layers)}: not the same architecture")
    for src, dst in zip(source_layers[:-1], target_layers[:-1]):
        weights = src.get_weights()
        if src is source_layers[0]:  # a gray start model for a colour run: its first kernel widened
            weights = widened_to_colour(weights, [tuple(w.shape) for w in dst.weights])
        if [w.shape for w in weights] != [tuple(w.shape) for w in dst.weights]:
            raise CaptchaError(f"--init_from layer {src.name} has weights of shapes {[w.shape for w in weights]}, "
                               f"this model's {dst.name} {[tuple(w.shape) for w in dst.weights]}")
        dst.set_weights(weights)
    (src_kernel, src_bias), (kernel, bias) = source_layers[-1].get_weights(), target_layers[-1].get_weights()
    sources = output_class_sources(source_charset, target_charset)
    for target_class, source_class in enumerate(sources):
        if source_class is not None:  # kernel (features, classes), bias (classes,)
            kernel[:, target_class], bias[target_class] = src_kernel[:, source_class], src_bias[source_class]
    target_layers[-1].set_weights([kernel, bias])
    return "".join(s for s in target_charset.symbols if sources[target_charset.encode(s)[0]] is None)


def load_start(init_from):
    """The model to start from (a .keras path), its metadata, its network (a ModelConfig, or None for a file
    without one) and the pixels it learned from: its input size, resize arithmetic and CLAHE settings."""
    source_model, source_meta = model.load_model(init_from)
    config = model.ModelConfig.from_dict(source_meta["model_config"]) if source_meta.get("model_config") else None
    _, height, width, _ = source_model.input_shape
    options = dataclasses.replace(PreprocessOptions.from_dict(source_meta["preprocess"]), height=height, width=width)
    return source_model, source_meta, config, options


def start_from(source_model, source_meta, charset, config=None):
    """`source_model`'s network with `charset`'s output classes and every weight carried over (the output
    rows by symbol). `config`: its settings with this run's canvas and channels (None: as the source is).
    Returns (model, the symbols that start fresh)."""
    crnn = (model.build_model(config, charset.num_classes) if config is not None
            else model.with_output_classes(source_model, charset.num_classes))
    return crnn, copy_weights_by_symbol(source_model, Charset.from_dict(source_meta["charset"]), crnn, charset)


def widened_to_colour(weights, target_shapes):
    """A gray model's first convolution kernel (3, 3, 1, F) spread over three colour channels, a third on each:
    on a gray image given as three equal channels the widened model computes exactly what the gray one did."""
    kernel, *rest = weights
    if kernel.ndim == 4 and kernel.shape[2] == 1 and tuple(target_shapes[0])[2] == 3:
        kernel = np.repeat(kernel / 3.0, 3, axis=2)
    return [kernel, *rest]


def cnn_frozen(crnn):
    return any(not layer.trainable for layer in crnn.layers if isinstance(layer, keras.layers.Conv2D))


def set_cnn_trainable(crnn, trainable):
    """Freeze or thaw the convolution blocks (frozen BatchNorm also keeps its statistics)."""
    for layer in crnn.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization)):
            layer.trainable = trainable


def keep_log_rows_before(log_path, epoch):
    """Drop log rows of epochs that will run again after a resume."""
    if not log_path.exists():
        return
    with open(log_path) as f:
        lines = f.read().splitlines()
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",")[0]) < epoch]
    log_path.write_text("\n".join(kept) + "\n")


def validation_history(log_path):
    """(val_cer, val_exact_match) of each epoch in a run's log, for callbacks that look back after a resume."""
    if not log_path.exists():
        return []
    with open(log_path) as f:
        return [(float(row["val_cer"]), float(row["val_exact_match"])) for row in csv.DictReader(f)]


def run_identity(folder, train_set, val_set, test_set):
    """What makes a run's numbers mean what they say: which images are in which split (a hash of the three
    lists of path, relative to the folder, and label). Stored in every model the run writes, checked
    before a resume."""
    split = json.dumps([sorted((os.path.relpath(path, folder), label) for path, label in part)
                        for part in (train_set, val_set, test_set)]).encode()
    return {"split_sha256": hashlib.sha256(split).hexdigest(),
            "split_sizes": [len(train_set), len(val_set), len(test_set)]}


def check_same_run(saved, meta, folder, path):
    """A resume must train and score on the images, charset and label length the run started with."""
    for key, what in [("charset", "charset"), ("max_len", "label length"), ("labels", "labels' source"),
                      ("case", "letter case"), ("run", "split (which images train, validate and test)")]:
        if key in ("labels", "case") and key not in saved:  # written before labels had sources: read by name
            continue
        if saved.get(key) != meta[key]:
            raise CaptchaError(f"{folder}: its {what} is not the one {path} was trained with (the folder changed "
                               f"since the run started); resuming would remap classes or leak test images. "
                               f"Restore the folder, or start a new run with another --out")


def resume_config(cfg):
    """The interrupted run's own settings, read from its resume checkpoint in --out."""
    path = Path(cfg.out) / RESUME_NAME
    meta = model.read_meta(path) if path.exists() else None
    if meta is None or "resume" not in meta:
        raise CaptchaError(f"{path}: no interrupted run to resume in {cfg.out}")
    saved = meta["resume"]["config"]
    print(f"resuming the run in {cfg.out} after epoch {meta['resume']['epochs_done']} with its saved settings")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    source = label_sources.LabelSource.from_dict(meta["labels"]) if "labels" in meta else None
    return TrainConfig(**{**{k: v for k, v in saved.items() if k in fields}, "out": cfg.out, "resume": True}), source


def train(cfg):
    # ---- phase 1, the data: the folder (or the interrupted run's own settings), charset, label length, split
    source = None
    if cfg.resume:  # the run's own settings, and its labels read as they were (the same labels file, unchanged)
        cfg, source = resume_config(cfg)
    folder = resolve_data(cfg)
    if not cfg.data_dir and not cfg.limit:  # the cache may hold more than this run asked for
        cfg = dataclasses.replace(cfg, limit=cfg.synth_count)
    charset, max_len, train_set, val_set, test_set, scan = load_dataset(cfg, folder, source)
    # ---- phase 2, the network, the recipe and the pixels: a preset's, or those of the model it starts from
    if cfg.preset == "auto":  # on a GPU too: the network whose results on real captchas were measured
        cfg = dataclasses.replace(cfg, preset="fast")
    if cfg.preset not in model.PRESETS:
        raise CaptchaError(f"unknown --preset {cfg.preset!r}; choose from {sorted(model.PRESETS)} or auto")
    config = model.PRESETS[cfg.preset]
    init_from = resolve_init_from(cfg)
    if init_from:  # fine-tuning keeps the architecture and the pixels it starts from, read from the file itself
        source_model, source_meta, config, source_options = load_start(init_from)
    if cfg.recipe not in model.RECIPES:
        raise CaptchaError(f"unknown --recipe {cfg.recipe!r}; choose from {sorted(model.RECIPES)}")
    recipe = model.RECIPES[cfg.recipe]
    recipe = dataclasses.replace(recipe, batch_size=cfg.batch_size or recipe.batch_size,
                                 learning_rate=cfg.learning_rate or recipe.learning_rate,
                                 augment=recipe.augment if cfg.augment == "recipe" else cfg.augment,
                                 settle_epochs=recipe.settle_epochs if cfg.settle_epochs < 0 else cfg.settle_epochs,
                                 clean_finish=recipe.clean_finish if cfg.clean_finish < 0 else cfg.clean_finish,
                                 ema_momentum=recipe.ema_momentum if cfg.ema_momentum < 0 else cfg.ema_momentum)
    if recipe.augment not in augment.CHOICES:
        raise CaptchaError(f"unknown --augment {recipe.augment!r}; choose from recipe, {', '.join(augment.CHOICES)}")
    if not 0 <= recipe.clean_finish <= 1:
        raise CaptchaError(f"--clean_finish {recipe.clean_finish:g}: a fraction of the epochs, from 0 to 1 "
                           f"(-1: the recipe's)")
    if not 0 <= recipe.ema_momentum < 1:
        raise CaptchaError(f"--ema_momentum {recipe.ema_momentum:g}: from 0 (off) to below 1, e.g. 0.995 "
                           f"(-1: the recipe's)")
    if init_from and config is None:  # a start model without its settings (a converted reference checkpoint)
        if cfg.height or cfg.width or cfg.channels != source_options.channels:
            raise CaptchaError(f"--init_from {init_from}: its network settings are not stored in it, so its canvas "
                               f"and channels cannot change; drop --height, --width and --channels")
        options = dataclasses.replace(source_options, auto_crop=cfg.auto_crop, force_invert=cfg.force_invert,
                                      strong=cfg.strong)
        steps = source_model.output_shape[1]
    else:
        config = resolve_canvas(cfg, config, scan.median_aspect(), init_from)
        switches = dict(auto_crop=cfg.auto_crop, force_invert=cfg.force_invert, strong=cfg.strong)
        options = (dataclasses.replace(source_options, height=config.height, width=config.width,
                                       channels=config.channels, **switches) if init_from
                   else recipe.preprocess_options(config, **switches))
        steps = model.time_steps(config)
    check_time_steps(steps, max_len, options.height, options.width, scan.median_aspect())
    meta = {**model.make_meta(charset, max_len, options, config), "labels": scan.source.to_dict(), "case": scan.case,
            "run": run_identity(folder, train_set, val_set, test_set)}

    # ---- phase 3, the batches and how many updates
    epochs, repeats = plan_epochs(cfg.epochs, cfg.min_steps, len(train_set), recipe.batch_size)
    if not cfg.data_dir and not cfg.epochs and not model.gpu_names():  # the built-in run, sized for a laptop
        epochs = cpu_builtin_epochs(len(train_set) * repeats, recipe.batch_size)
        print(f"no GPU: the built-in run is sized for a CPU, {epochs} epochs (about {CPU_BUILTIN_STEPS} steps); "
              f"--epochs {DEFAULT_EPOCHS} makes the full run a GPU makes")
    augment_epochs = epochs - round(epochs * recipe.clean_finish)  # the epochs before the clean finish
    train_batches, val_batches, test_batches = make_split_batches(cfg, train_set, val_set, test_set, charset, max_len,
                                                                  options, recipe.batch_size, recipe.augment, repeats,
                                                                  augment_epochs)
    print(f"{epochs} epochs of {len(train_batches)} steps = {epochs * len(train_batches)} optimizer steps"
          + (f" ({repeats} passes over the training images an epoch)" if repeats > 1 else "")
          + ("" if cfg.epochs else f" (at least --min_steps {cfg.min_steps}, at least {DEFAULT_EPOCHS} passes)")
          + f"; augmentation: {recipe.augment}"
          + ("" if recipe.augment == "none" or augment_epochs >= epochs
             else f" for epochs 1-{augment_epochs}, then the images as they are" if augment_epochs
             else " (no epoch: --clean_finish 1)")
          + (f"; ends once the validation CER holds {recipe.settle_epochs} epochs" if recipe.settle_epochs else ""))

    # ---- phase 4, the model on its devices: new, fine-tuned from another model, or resumed with its optimizer
    keras.utils.set_random_seed(cfg.seed)
    gpus = model.gpu_names()
    print(f"Keras {keras.__version__} ({keras.backend.backend()} backend) on {', '.join(gpus) or 'CPU (no GPU found)'}")
    strategy = make_strategy(cfg.strategy, len(gpus))
    if strategy is not None:
        print(f"strategy: MirroredStrategy, {strategy.num_replicas_in_sync} replicas; global batch {recipe.batch_size}"
              f" = {recipe.batch_size / strategy.num_replicas_in_sync:g} per replica")
    # Variables (weights, optimizer state) must be made inside the strategy's scope to be mirrored.
    in_scope = strategy.scope if strategy is not None else contextlib.nullcontext
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    epochs_done, best_score = 0, np.inf
    if cfg.resume:
        with in_scope():
            crnn, saved = model.load_model(out / RESUME_NAME, compile=True)
        check_same_run(saved, meta, folder, out / RESUME_NAME)
        epochs_done, best_score = saved["resume"]["epochs_done"], saved["resume"]["best_score"]
        train_batches.epoch = epochs_done  # the augmentation of the next epoch, as in an uninterrupted run
        keep_log_rows_before(out / LOG_NAME, epochs_done)
    else:
        with in_scope():
            crnn, fresh = (start_from(source_model, source_meta, charset, config) if init_from
                           else (model.build_model(config, charset.num_classes), ""))
        if init_from:
            print(f"starting from {init_from}" + (f"; output rows for new symbols start untrained: {fresh}"
                                                  if fresh else " (every symbol's output row carried over)"))
    # ---- phase 5, training: convolutions frozen for --freeze_cnn_epochs (fine-tuning only), then every weight
    frozen_until = cfg.freeze_cnn_epochs if init_from else 0

    def compile_for(first_epoch, last_epoch):
        with in_scope():
            model.compile_model(crnn, charset, recipe, total_steps=(last_epoch - first_epoch) * len(train_batches))

    if not cfg.resume:  # (a resumed model comes compiled, with its optimizer state and frozen layers as saved)
        set_cnn_trainable(crnn, not frozen_until)  # phase 1, if any: the convolutions keep their pre-trained weights
        compile_for(0, frozen_until or epochs)
    schedule = {"onecycle": "one-cycle peak", "plateau": "halved on plateau from", "constant": "constant"}[recipe.schedule]
    architecture = f"as {init_from}" if init_from else f"preset {cfg.preset}, from scratch"
    print(f"model: {architecture}, {crnn.count_params():,} parameters, input {options.width}x{options.height} "
          f"{'colour' if options.channels == 3 else 'gray'}, {steps} time steps; "
          f"recipe {cfg.recipe}: {recipe.optimizer}, {schedule} {recipe.learning_rate:g}, batch {recipe.batch_size}"
          + (f"; read and saved: the weights' moving average (momentum {recipe.ema_momentum:g})"
             if recipe.ema_momentum else ""))

    csv_log = keras.callbacks.CSVLogger(str(out / LOG_NAME), append=cfg.resume)
    best_checkpoint = BestCheckpoint(out / BEST_NAME, meta, recipe.monitor, best_score)
    resume_checkpoint = ResumeCheckpoint(out / RESUME_NAME, meta, cfg, best_checkpoint, epochs_done)
    averaged = AveragedWeights() if recipe.ema_momentum else None
    clock = EpochClock()
    callbacks = [
        clock,  # first: it times the steps, and the epoch's end from here to clock.stop
        averaged,  # next: everything up to averaged.restore sees the averaged weights
        # next: validation and checkpoints see the recomputed statistics
        PreciseBatchNorm(train_batches, recipe.precise_bn_batches) if recipe.precise_bn_batches else None,
        ValidationMetrics(val_batches, charset, [label for _, label in val_set]),  # the rest read its numbers
        best_checkpoint,
        early_stopping(recipe, cfg.patience),
        StopWhenSettled(recipe.settle_epochs, validation_history(out / LOG_NAME) if cfg.resume else ())
        if recipe.settle_epochs else None,
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=recipe.plateau_patience,
                                          min_lr=1e-5, verbose=1)
        if recipe.schedule == "plateau" else None,  # a one-cycle schedule sets the rate itself
        clock.stop,
        csv_log,
        DurationEstimate((epochs - epochs_done) * len(train_batches)) if len(train_batches) > 25 else None,
        averaged.restore if averaged else None,  # training goes on from the trained weights, and resumes from them
        resume_checkpoint,  # it records what the others decided
        STOP,  # last: a stop asked for during the epoch's end waits until its checkpoints are written
    ]
    callbacks = [callback for callback in callbacks if callback is not None]
    started = time.time()
    verbose = 1 if sys.stdout.isatty() else 2  # progress bars on terminals only
    finished = cfg.resume and saved["resume"].get("finished", False)  # stopped while scoring: only that is left
    histories, first_epoch = [], epochs_done
    STOP.in_fit = True  # from here a first Ctrl-C or SIGTERM stops between steps
    try:
        if not finished and first_epoch < frozen_until:  # phase 1: the convolutions keep their pre-trained weights
            print(f"epochs {first_epoch + 1}-{frozen_until}: convolutions frozen")
            histories.append(crnn.fit(train_batches, epochs=frozen_until,
                                      initial_epoch=first_epoch, callbacks=callbacks, verbose=verbose))
            first_epoch += len(histories[-1].history.get("loss", []))
            csv_log.append = True  # phase 2 adds to phase 1's rows
        if not finished and first_epoch == frozen_until and cnn_frozen(crnn):  # phase 1 is over: thaw, and a
            set_cnn_trainable(crnn, True)  # fresh optimizer and schedule for every weight (made at the boundary only,
            compile_for(first_epoch, epochs)  # so a resume later in phase 2 keeps phase 2's optimizer state)
        if not finished and first_epoch >= frozen_until:  # phase 1 (if any) was not stopped early
            histories.append(crnn.fit(train_batches, epochs=epochs,
                                      initial_epoch=first_epoch, callbacks=callbacks, verbose=verbose))
    except KeyboardInterrupt:
        resume_checkpoint.save()  # this epoch's progress too; the epoch itself runs again on resume
        print(f"\ninterrupted after {resume_checkpoint.epochs_done} complete epochs; saved "
              f"{out / RESUME_NAME}. Continue with: python train.py --resume --out {out}")
        return None
    finally:  # (whatever ended fit(): a signal from here on stops at once)
        STOP.in_fit = False
        train_batches.close()  # its worker processes, if any
    # ---- phase 6, the final model, then the best checkpoint scored on the test split
    train_seconds = max(time.time() - started, 1e-6)
    epochs_run = epochs_done + sum(len(h.history.get("loss", [])) for h in histories)
    if not finished:
        model.save_model(crnn, out / FINAL_NAME, meta)
        resume_checkpoint.save(finished=True)  # from here a stop leaves only the scoring to do again
    try:
        results = score_run(out, folder, cfg, charset, options, train_set, test_set, test_batches, epochs_run,
                            epochs_done, train_seconds, repeats=repeats)
    except KeyboardInterrupt:
        print(f"\ninterrupted while scoring; training is complete and saved in {out}. Score it with: "
              f"python train.py --resume --out {out}")
        return None
    (out / RESUME_NAME).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    return results


def score_run(out, folder, cfg, charset, options, train_set, test_set, test_batches, epochs_run, epochs_done,
              train_seconds, *, repeats=1):
    """The best checkpoint on the test split, which chose nothing (validation chose the checkpoint), so
    this is a clean score; metrics.json and the plots."""
    best, _ = model.load_model(out / BEST_NAME)
    test_labels = [label for _, label in test_set]
    scores, predictions, confidences = evaluate(best, test_batches, charset, test_labels)
    results = {
        "test": scores,
        "confidence": metrics.confidence_ranking(predictions, test_labels, confidences),
        "checkpoint": str(out / BEST_NAME),
        "epochs_run": epochs_run,
        "train_seconds_this_session": round(train_seconds, 1),
        "images_per_second_with_validation": round(len(train_set) * repeats * (epochs_run - epochs_done) / train_seconds, 1),
        "data_dir": str(folder),
        "config": dataclasses.asdict(cfg),
        "log": str(out / LOG_NAME),
        "examples": [{"truth": t, "prediction": p} for t, p in list(zip(test_labels, predictions))[:20]],
        # every test image's reading: plots.py redraws a run from these, and the misread ones are there to look at
        "readings": [{"path": str(path), "truth": t, "prediction": p, "confidence": float(f"{c:.6g}")}
                     for (path, t), p, c in zip(test_set, predictions, confidences)],
    }
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    shown = np.stack([preprocess.load_image(path, options) for path, _ in test_set[:24]])
    pictures = plots.write_run_plots(out, out / LOG_NAME, shown, test_labels, predictions)
    print(f"plots: {', '.join(str(p) for p in pictures)}")
    print(f"test split ({scores['count']} images, best checkpoint): exact match {scores['exact_match']:.4f} "
          f"({scores['exact_match_ignore_case']:.4f} ignoring case), CER {scores['cer']:.4f}; wrote {out / 'metrics.json'}")
    ranked = results["confidence"]
    if ranked["count_rest"] and ranked["count_confident"]:
        print(f"confidence ranks errors: exact match {ranked['exact_match_confident']:.4f} on the "
              f"{ranked['count_confident']} most confident readings (confidence >= {ranked['threshold']:.3f}), "
              f"{ranked['exact_match_rest']:.4f} on the other {ranked['count_rest']}")
    return results


def main(argv=None):
    cfg = parse_config(argv)
    STOP.reset()  # (main() may run more than once in a process: the tests call it)

    def on_signal(signum, frame):  # preemptible machines send SIGTERM first: stop as cleanly as on Ctrl-C
        STOP.request(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can Python take signals
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(s, on_signal) for s in stop_signals] if in_main_thread else []
    try:
        results = train(cfg)
    except CaptchaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for s, handler in zip(stop_signals, previous):
            signal.signal(s, handler)
    return 0 if results is not None else 128 + (STOP.signal or signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(main())
