"""Benchmark training recipes on generated captchas: accuracy against wall-clock time, side by side.

    python tools/bench.py                                   # reference vs default, 60 minutes each
    python tools/bench.py --minutes 10 --runs default=fast:default
    python tools/bench.py --style gregwar                   # data that looks like the reference's Kaggle set
    python tools/bench.py --data_dir path/to/images --runs default=fast:default+base@30,kerasio=kerasio:kerasio@30
                                                      # a real folder: train.py's split, its test part scores

Each run is NAME=PRESET:RECIPE[+START][@MINUTES] (presets and recipes from model.py; START: `base`, the shipped base
model, or a .keras path to fine-tune, whose network and pixels are then used instead of the preset's, as train.py
--init_from does; MINUTES overrides --minutes). `fast:default+base` is what `train.py` does by default. All runs
train on the same data (generated, or --data_dir split as train.py splits it) with their recipe's augmentation, and
are scored on the same held-out test images (after recomputing the BatchNorm statistics when the recipe does). They take turns in slices of
--slice_seconds, so a busy machine slows them alike; each run's clock counts only its own training
(evaluation is not counted). Every --eval_minutes of a run's own time it is scored on the test set.
Writes bench.json (every curve point), bench_curves.png, each run's final model (NAME.keras) and a
table to stdout.
"""

import dataclasses
import json
import math
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import quiet  # noqa: F401  (first: TensorFlow's start-up lines off; quiet.py)
import keras
import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit's modules, one folder up

import callbacks
import cli
import dataset
import finetune
import metrics
import model
import modelmeta
import charsets
import imagefiles
import preprocess
import reader
import recipes
import synth
import train
from charsets import Charset
from errors import CaptchaError


@dataclass
class BenchConfig:
    runs: str = "reference=seed:reference,default=fast:default"
    data_dir: str = ""  # a real folder, labels read as train.py reads them; empty: generated captchas (--style, ...)
    labels_from: str = "auto"  # as train.py: the file-name rule (auto, name, prefix, suffix, regex:PATTERN)
    labels: str = ""  # as train.py: a labels file
    minutes: float = 60.0  # training time of each run
    train_count: int = 40000
    test_count: int = 1000
    length: int = 5
    charset: str = "default"
    style: str = "captcha"  # the synthetic style: captcha or gregwar (the look of the reference's Kaggle set)
    data_seed: int = 2024
    seed: int = 0
    slice_seconds: float = 60.0
    eval_minutes: float = 5.0
    data_root: str = "data/bench"
    out: str = "runs/bench"


def parse_config(argv=None):
    return cli.parse(BenchConfig, argv, description=__doc__)


def bench_data(cfg, charset):
    """Generated once per (seed, size, charset, length) and cached; the test images come from another seed."""
    root = Path(cfg.data_root) / f"{cfg.style}_{cfg.charset}_len{cfg.length}_seed{cfg.data_seed}"
    parts = {}
    for part, count, seed in [("train", cfg.train_count, cfg.data_seed), ("test", cfg.test_count, cfg.data_seed + 1)]:
        folder = root / f"{part}_{count}"
        if not folder.is_dir() or len(imagefiles.list_images(folder)) != count:
            shutil.rmtree(folder, ignore_errors=True)  # half-written by an interrupted run: start clean
            synth.generate_synthetic(folder, count, synth.Drawing(style=cfg.style, symbols=charset.symbols, length=cfg.length), seed=seed)
        parts[part] = dataset.scan_folder(folder, charset, cfg.length, verify=False).samples
    return parts["train"], parts["test"]


def folder_data(cfg):
    """A real folder, scanned and split exactly as train.py does (its defaults): its train part trains, its
    test part scores. Returns (charset, longest label, train samples, test samples)."""
    # channels=1: the contenders read the pixels of their recipe or start model, gray
    run = train.TrainConfig(data_dir=cfg.data_dir, labels_from=cfg.labels_from, labels=cfg.labels, channels=1)
    charset, max_len, train_samples, _, test_samples, _, _ = train.load_dataset(run, Path(cfg.data_dir))
    return charset, max_len, train_samples, test_samples


class Contender:
    """One recipe being trained: its model, its batches, and its own clock."""

    def __init__(self, name, preset, recipe_name, start_from, minutes, cfg, charset, max_len, train_samples):
        self.name, self.preset, self.recipe_name, self.start_from = name, preset, recipe_name, start_from
        self.recipe, self.charset = recipes.RECIPES[recipe_name], charset
        if start_from:  # fine-tuning, as train.py --init_from: the network and pixels of the file
            source_model, source_meta, self.model_config, self.options = finetune.load_start(
                finetune.BASE_MODEL if start_from == "base" else Path(start_from))
            self.source = source_model, source_meta
        else:
            self.source, self.model_config = None, model.PRESETS[preset]
            self.options = self.recipe.preprocess_options()
        self.batches = dataset.make_batches(train_samples, charset, max_len, dataset.Batching(options=self.options, batch_size=self.recipe.batch_size, shuffle=True, seed=cfg.seed, augment=self.recipe.augment), workers=1)
        self.budget = minutes * 60
        self.seconds, self.images, self.step, self.curve = 0.0, 0, 0, []
        self.pool = ThreadPoolExecutor(2)
        self.crnn = None
        # what train.py does at an epoch's end before it reads the model, and after (callbacks.reading_state)
        self.before_reading, self.after_reading = [], []

    def new_model(self):
        if self.source is None:
            return model.build_model(self.model_config, self.charset.num_classes, self.options.canvas)
        return finetune.start_from(*self.source, self.charset)[0]

    def next_batch(self):
        """Batches load on a thread while the previous one trains."""
        index = self.step % len(self.batches)
        batch = self.pending.result() if self.step else self.batches[index]
        if index == len(self.batches) - 1:  # the next batch starts a new epoch: new order, new augmentation
            self.batches.on_epoch_end()
        self.pending = self.pool.submit(self.batches.__getitem__, (index + 1) % len(self.batches))
        self.step += 1
        return batch

    def start(self, seed):
        """Measures steps per second on a scratch copy, to size the one-cycle schedule to the budget."""
        keras.utils.set_random_seed(seed)
        scratch = recipes.compile_model(self.new_model(), self.charset, self.recipe, total_steps=100)
        images, labels = self.batches[0]
        scratch.train_on_batch(images, labels)  # traces the step function
        started = time.time()
        for _ in range(5):
            scratch.train_on_batch(images, labels)
        steps_per_second = 5 / (time.time() - started)
        self.total_steps = max(10, int(self.budget * steps_per_second * 0.9))  # loading costs some time too
        # the recipe's clean finish, as in train.py: the end of the schedule reads the images as they are
        self.batches.augment_epochs = math.ceil(self.total_steps * (1 - self.recipe.clean_finish) / len(self.batches))
        keras.utils.set_random_seed(seed)
        self.crnn = recipes.compile_model(self.new_model(), self.charset, self.recipe, total_steps=self.total_steps)
        self.before_reading, self.after_reading = callbacks.reading_state(self.recipe, self.batches)
        for callback in self.before_reading + self.after_reading:
            callback.set_model(self.crnn)
        self.crnn.train_on_batch(images, labels)  # trace before the clock starts; counts as a step
        self.images += len(images)

    def train_for(self, seconds):
        started = time.time()
        while time.time() - started < seconds and self.seconds + (time.time() - started) < self.budget:
            images, labels = self.next_batch()
            loss = self.crnn.train_on_batch(images, labels)
            self.images += len(images)
        self.seconds += time.time() - started
        self.last_loss = float(loss) if "loss" in locals() else float("nan")

    def done(self):
        return self.seconds >= self.budget - 1e-6

    def score(self, test_images, test_labels):
        for callback in self.before_reading:
            callback.on_epoch_end(len(self.curve))
        scores = score(self.crnn, self.charset, test_images, test_labels)
        for callback in self.after_reading:
            callback.on_epoch_end(len(self.curve))
        return scores


def score(crnn, charset, test_images, test_labels):
    predictions = []
    for i in range(0, len(test_images), 256):
        predictions += reader.decode(crnn.predict_on_batch(test_images[i : i + 256]), charset)
    return metrics.score(predictions, test_labels)


def plot_curves(contenders, path):
    fig = Figure(figsize=(10, 3.6))
    exact_ax, cer_ax = fig.subplots(1, 2)
    for c in contenders:
        minutes = [p["minutes"] for p in c.curve]
        exact_ax.plot(minutes, [p["exact_match"] for p in c.curve], "o-", label=f"{c.name} ({c.preset}, {c.recipe_name})")
        cer_ax.plot(minutes, [p["cer"] for p in c.curve], "o-", label=c.name)
    exact_ax.set(title="test exact match", xlabel="training minutes", ylim=(0, 1))
    cer_ax.set(title="test CER", xlabel="training minutes", ylim=(0, 1))
    exact_ax.legend(fontsize=8)
    for ax in (exact_ax, cer_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def bench(cfg):
    if cfg.data_dir:
        charset, max_len, train_samples, test_samples = folder_data(cfg)
        described = f"images of {cfg.data_dir}, up to {max_len}"
    else:
        charset, max_len = Charset(charsets.CHARSET_PRESETS.get(cfg.charset, cfg.charset)), cfg.length
        train_samples, test_samples = bench_data(cfg, charset)
        described = f"{cfg.style}-style captchas, {cfg.length}"
    test_images = {}  # by preprocessing options: the reference recipe reads its own way

    def test_images_for(options):
        if options not in test_images:
            test_images[options] = np.stack([preprocess.load_image(p, options) for p, _ in test_samples])
        return test_images[options]

    test_labels = [label for _, label in test_samples]
    print(f"data: {len(train_samples)} train / {len(test_samples)} test {described} of "
          f"{len(charset.symbols)} symbols; {cfg.minutes:g} training minutes per run")

    contenders = []
    for spec in cfg.runs.split(","):
        name, _, rest = spec.partition("=")
        rest, _, minutes = rest.partition("@")
        rest, _, start_from = rest.partition("+")
        preset, _, recipe = rest.partition(":")
        if preset not in model.PRESETS or recipe not in recipes.RECIPES:
            raise CaptchaError(f"--runs {spec!r}: expected NAME=PRESET:RECIPE[+START][@MINUTES] with a preset of "
                               f"{sorted(model.PRESETS)} and a recipe of {sorted(recipes.RECIPES)}")
        if start_from and start_from != "base" and not Path(start_from).is_file():
            raise CaptchaError(f"--runs {spec!r}: {start_from}: no such model file to start from (or use +base)")
        contender = Contender(name, preset, recipe, start_from, float(minutes or cfg.minutes), cfg, charset, max_len,
                              train_samples)
        contender.start(cfg.seed)
        contenders.append(contender)
        schedule = (f"one-cycle schedule sized for {contender.total_steps} steps" if contender.recipe.schedule == "onecycle"
                    else f"constant learning rate {contender.recipe.learning_rate:g} (no plateau watch or early "
                         f"stopping here)")
        network = f"as {start_from}, from its weights" if start_from else f"preset {preset}, from scratch"
        print(f"{name}: {network}, recipe {recipe}, {contender.crnn.count_params():,} parameters, {schedule}, "
              f"augmentation {contender.recipe.augment}")

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    while not all(c.done() for c in contenders):
        for c in contenders:
            if c.done():
                continue
            next_eval = (len(c.curve) + 1) * cfg.eval_minutes * 60
            c.train_for(min(cfg.slice_seconds, next_eval - c.seconds))
            if c.seconds >= min(next_eval, c.budget) - 1e-6:
                point = {"minutes": round(c.seconds / 60, 2), "images": c.images, "loss": c.last_loss,
                         **c.score(test_images_for(c.options), test_labels)}
                c.curve.append(point)
                print(f"{c.name:>10} {point['minutes']:6.1f} min  {point['images']:8d} img  loss {point['loss']:7.3f}  "
                      f"exact {point['exact_match']:.4f}  (ignoring case {point['exact_match_ignore_case']:.4f})  "
                      f"CER {point['cer']:.4f}", flush=True)

    results = []
    for c in contenders:  # the trained models too: a pre-trained start for fine-tuning (train.py --init_from)
        model.save_model(c.crnn, out / f"{c.name}.keras", modelmeta.make_meta(charset, max_len, c.options, c.model_config))
        first = next((p["minutes"] for p in c.curve if p["exact_match"] > 0), None)
        results.append({"name": c.name, "preset": c.preset, "recipe": c.recipe_name, "start_from": c.start_from or "none",
                        **c.curve[-1],
                        "train_images_per_second": round(c.images / c.seconds, 1),
                        "minutes_to_first_nonzero_exact_match": first, "curve": c.curve})
    (out / "bench.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "results": results}, indent=2))
    plot_curves(contenders, out / "bench_curves.png")
    print("\n| run | preset | recipe | minutes | exact match | exact, ignoring case | CER | train img/s | first exact > 0 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        first = f"{r['minutes_to_first_nonzero_exact_match']} min" if r["minutes_to_first_nonzero_exact_match"] else "never"
        print(f"| {r['name']} | {r['preset']} | {r['recipe']} | {r['minutes']} | {r['exact_match']:.4f} | "
              f"{r['exact_match_ignore_case']:.4f} | {r['cer']:.4f} | {r['train_images_per_second']} | {first} |")
    print(f"wrote {out / 'bench.json'}, {out / 'bench_curves.png'} and the models {out}/NAME.keras")
    return results


def main(argv=None):
    cfg = parse_config(argv)
    return cli.exit_status(lambda: bench(cfg))


if __name__ == "__main__":
    sys.exit(main())
