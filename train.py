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

A run, top to bottom (train()): 1. the data, 2. the network, recipe and pixels, 3. the batches and
the plan, 4. the model on its devices (new, fine-tuned or resumed), 5. training, 6. the final model
and the test score. The callbacks and their order are callbacks.py; fine-tuning is finetune.py; a
run's files, identity and resume checks are runstate.py.
"""

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

import augment
import callbacks
import cli
import dataset
import finetune
import labels as label_sources
import model
import modelmeta
import preprocess
import recipes
import runstate
import scoring
import synth
from preprocess import CaptchaError


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
    recipe: str = "default"  # optimizer and schedule: default (AdamW, one-cycle), reference, kerasio (recipes.RECIPES)
    # Settings left unset (None) take the recipe's value.
    epochs: int | None = None  # passes: 30, or more on a small folder so that training makes at least --min_steps
    #                            updates (on a CPU, the built-in run makes about 3,000 steps)
    min_steps: int = 3000  # with --epochs unset: the fewest optimizer steps (batches) a run makes
    augment: str | None = None  # on-the-fly training augmentation: none, light, strong (the recipe's: light or none)
    clean_finish: float | None = None  # the last fraction of the epochs without augmentation (the recipe's: 0.25)
    ema_momentum: float | None = None  # evaluate and save a moving average of the weights, e.g. 0.995 (0: off;
    #                                    the recipes': off)
    batch_size: int | None = None  # the recipe's: 32 (default), 128 (reference), 16 (kerasio)
    learning_rate: float | None = None  # the recipe's (the peak, for one-cycle)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42  # split, shuffling and weight initialisation
    settle_epochs: int | None = None  # end once the validation CER has held this many epochs (0: never; the
    #                                     recipe's: 10 for default, never for reference and kerasio)
    patience: int | None = None  # epochs without a better validation score before stopping, for recipes that stop
    #                              early (the recipe's: 5 reference, 10 kerasio; a one-cycle run never does)
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


def parse_config(argv=None):
    return cli.parse(TrainConfig, argv, description=__doc__)


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


def resolve_recipe(cfg):
    """The recipe with this run's flags in it: a flag left unset (None) keeps the recipe's value."""
    if cfg.recipe not in recipes.RECIPES:
        raise CaptchaError(f"unknown --recipe {cfg.recipe!r}; choose from {sorted(recipes.RECIPES)}")
    recipe = recipes.RECIPES[cfg.recipe]
    flags = {"batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "augment": cfg.augment,
             "settle_epochs": cfg.settle_epochs, "clean_finish": cfg.clean_finish, "ema_momentum": cfg.ema_momentum,
             "stop_patience": cfg.patience}
    recipe = dataclasses.replace(recipe, **{name: value for name, value in flags.items() if value is not None})
    if recipe.augment not in augment.CHOICES:
        raise CaptchaError(f"unknown --augment {recipe.augment!r}; choose from {', '.join(augment.CHOICES)}")
    if not 0 <= recipe.clean_finish <= 1:
        raise CaptchaError(f"--clean_finish {recipe.clean_finish:g}: a fraction of the epochs, from 0 to 1")
    if not 0 <= recipe.ema_momentum < 1:
        raise CaptchaError(f"--ema_momentum {recipe.ema_momentum:g}: from 0 (off) to below 1, e.g. 0.995")
    if cfg.patience is not None and recipe.schedule == "onecycle":
        print(f"--patience {cfg.patience}: not used, a one-cycle run ({cfg.recipe} recipe) runs its whole schedule "
              f"unless its validation settles (--settle_epochs)")
    return recipe


@dataclass
class Network:
    """Phase 2's result: the network's settings, the pixels it reads, and where its weights start."""

    config: model.ModelConfig | None  # None: a start model that stores no settings (a converted reference one)
    options: preprocess.PreprocessOptions
    steps: int  # CTC time steps
    init_from: Path | None = None
    start: tuple | None = None  # (start model, its metadata)


def resolve_network(cfg, recipe, scan, max_len):
    """The network and its pixels: a preset's, or those of the model it starts from, with this run's canvas."""
    preset = "fast" if cfg.preset == "auto" else cfg.preset  # on a GPU too: the network measured on real captchas
    if preset not in model.PRESETS:
        raise CaptchaError(f"unknown --preset {cfg.preset!r}; choose from {sorted(model.PRESETS)} or auto")
    config, start, start_options = model.PRESETS[preset], None, None
    init_from = finetune.resolve_init_from(cfg.init_from, preset, cfg.recipe)
    if init_from:  # fine-tuning keeps the architecture and the pixels it starts from, read from the file itself
        source_model, source_meta, config, start_options = finetune.load_start(init_from)
        start = source_model, source_meta
    switches = dict(auto_crop=cfg.auto_crop, force_invert=cfg.force_invert, strong=cfg.strong)
    median_aspect = scan.median_aspect()
    if init_from and config is None:
        if cfg.height or cfg.width or cfg.channels != start_options.channels:
            raise CaptchaError(f"--init_from {init_from}: its network settings are not stored in it, so its canvas "
                               f"and channels cannot change; drop --height, --width and --channels")
        network = Network(None, dataclasses.replace(start_options, **switches), start[0].output_shape[1], init_from,
                          start)
    else:
        config = model.canvas_config(config, height=cfg.height, width=cfg.width, channels=cfg.channels,
                                     median_aspect=median_aspect, start_model=init_from)
        options = (dataclasses.replace(start_options, height=config.height, width=config.width,
                                       channels=config.channels, **switches) if init_from
                   else recipe.preprocess_options(config, **switches))
        network = Network(config, options, model.time_steps(config), init_from, start)
    model.check_time_steps(network.steps, max_len, network.options.height, network.options.width, median_aspect)
    return network


def cpu_sized(cfg):
    """The built-in run on a machine without a GPU is sized for a laptop, unless --epochs says otherwise."""
    return not cfg.data_dir and not cfg.epochs and not model.gpu_names()


def plan_run(cfg, recipe, train_images):
    """(epochs, passes over the training images per epoch, the epochs before the clean finish)."""
    epochs, repeats = recipes.plan_epochs(cfg.epochs, cfg.min_steps, train_images, recipe.batch_size)
    if cpu_sized(cfg):
        epochs = recipes.cpu_builtin_epochs(train_images * repeats, recipe.batch_size)
        print(f"no GPU: the built-in run is sized for a CPU, {epochs} epochs (about {recipes.CPU_BUILTIN_STEPS} steps); "
              f"--epochs {recipes.DEFAULT_EPOCHS} makes the full run a GPU makes")
    return epochs, repeats, epochs - round(epochs * recipe.clean_finish)


def describe_plan(cfg, recipe, epochs, steps_per_epoch, repeats, augment_epochs):
    print(f"{epochs} epochs of {steps_per_epoch} steps = {epochs * steps_per_epoch} optimizer steps"
          + (f" ({repeats} passes over the training images an epoch)" if repeats > 1 else "")
          + ("" if cfg.epochs or cpu_sized(cfg)
             else f" (at least --min_steps {cfg.min_steps}, at least {recipes.DEFAULT_EPOCHS} passes)")
          + f"; augmentation: {recipe.augment}"
          + ("" if recipe.augment == "none" or augment_epochs >= epochs
             else f" for epochs 1-{augment_epochs}, then the images as they are" if augment_epochs
             else " (no epoch: --clean_finish 1)")
          + (f"; ends once the validation CER holds {recipe.settle_epochs} epochs" if recipe.settle_epochs else ""))


def device_scope(cfg, recipe):
    """The context that places variables: MirroredStrategy's scope over 2+ GPUs, else none."""
    gpus = model.gpu_names()
    print(f"Keras {keras.__version__} ({keras.backend.backend()} backend) on {', '.join(gpus) or 'CPU (no GPU found)'}")
    strategy = model.make_strategy(cfg.strategy, len(gpus))
    if strategy is None:
        return contextlib.nullcontext
    print(f"strategy: MirroredStrategy, {strategy.num_replicas_in_sync} replicas; global batch {recipe.batch_size}"
          f" = {recipe.batch_size / strategy.num_replicas_in_sync:g} per replica")
    return strategy.scope  # variables (weights, optimizer state) made inside it are mirrored


def new_model(network, charset, in_scope):
    """A new model: the preset's, or the start model's with its weights carried over."""
    with in_scope():
        if not network.init_from:
            return model.build_model(network.config, charset.num_classes)
        crnn, fresh = finetune.start_from(*network.start, charset, network.config)
    print(f"starting from {network.init_from}" + (f"; output rows for new symbols start untrained: {fresh}"
                                                  if fresh else " (every symbol's output row carried over)"))
    return crnn


def describe_model(cfg, recipe, network, crnn):
    schedule = {"onecycle": "one-cycle peak", "plateau": "halved on plateau from", "constant": "constant"}[recipe.schedule]
    architecture = f"as {network.init_from}" if network.init_from else f"preset {cfg.preset}, from scratch"
    options = network.options
    print(f"model: {architecture}, {crnn.count_params():,} parameters, input {options.width}x{options.height} "
          f"{'colour' if options.channels == 3 else 'gray'}, {network.steps} time steps; "
          f"recipe {cfg.recipe}: {recipe.optimizer}, {schedule} {recipe.learning_rate:g}, batch {recipe.batch_size}"
          + (f"; read and saved: the weights' moving average (momentum {recipe.ema_momentum:g})"
             if recipe.ema_momentum else ""))


def fit_in_phases(crnn, train_batches, run_callbacks, *, first_epoch, frozen_until, epochs, compile_for):
    """fit() with the convolutions frozen until epoch `frozen_until` (fine-tuning with --freeze_cnn_epochs),
    then thawed, with a fresh optimizer and schedule for every weight. Returns the epochs trained."""
    verbose = 1 if sys.stdout.isatty() else 2  # progress bars on terminals only
    # shuffle=False: the loader shuffles itself from (seed, epoch); fit()'s own shuffle of the batch order draws
    # from Python's global random state, which a resumed run would not have
    fit = dict(callbacks=run_callbacks.all, verbose=verbose, shuffle=False)
    trained = 0
    if first_epoch < frozen_until:
        print(f"epochs {first_epoch + 1}-{frozen_until}: convolutions frozen")
        history = crnn.fit(train_batches, epochs=frozen_until, initial_epoch=first_epoch, **fit)
        trained = len(history.history.get("loss", []))
        first_epoch += trained
        run_callbacks.log.append = True  # the thawed epochs add to the frozen ones' rows
        if first_epoch < frozen_until:  # stopped early (settled, or EarlyStopping): nothing thawed
            return trained
    if first_epoch == frozen_until and finetune.cnn_frozen(crnn):  # made at the boundary only, so a resume later
        finetune.set_cnn_trainable(crnn, True)  # keeps the thawed epochs' optimizer state
        compile_for(first_epoch, epochs)
    history = crnn.fit(train_batches, epochs=epochs, initial_epoch=first_epoch, **fit)
    return trained + len(history.history.get("loss", []))


def resume_config(cfg):
    """The interrupted run's own settings and label source, read from its resume checkpoint in --out."""
    path = Path(cfg.out) / runstate.RESUME_NAME
    meta = modelmeta.read_meta(path) if path.exists() else None
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
    # ---- phase 2, the network, the recipe and the pixels
    recipe = resolve_recipe(cfg)
    network = resolve_network(cfg, recipe, scan, max_len)
    meta = {**modelmeta.make_meta(charset, max_len, network.options, network.config), "labels": scan.source.to_dict(),
            "case": scan.case, "run": runstate.run_identity(folder, train_set, val_set, test_set)}
    # ---- phase 3, the batches and how many updates
    epochs, repeats, augment_epochs = plan_run(cfg, recipe, len(train_set))
    train_batches, val_batches, test_batches = dataset.split_batches(
        train_set, val_set, test_set, charset, max_len, network.options, batch_size=recipe.batch_size,
        augmentation=recipe.augment, repeats=repeats, augment_epochs=augment_epochs, seed=cfg.seed,
        workers=cfg.workers, processes=cfg.processes, cache_mb=cfg.cache_mb)
    describe_plan(cfg, recipe, epochs, len(train_batches), repeats, augment_epochs)
    # ---- phase 4, the model on its devices: new, fine-tuned from another model, or resumed with its optimizer
    keras.utils.set_random_seed(cfg.seed)
    in_scope = device_scope(cfg, recipe)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    frozen_until = cfg.freeze_cnn_epochs if network.init_from else 0

    def compile_for(first_epoch, last_epoch):
        with in_scope():
            recipes.compile_model(crnn, charset, recipe, total_steps=(last_epoch - first_epoch) * len(train_batches))

    state = {"epochs_done": 0, "best_score": np.inf, "finished": False}
    if cfg.resume:  # compiled as saved: its optimizer state, and its frozen layers
        with in_scope():
            crnn, saved = model.load_model(out / runstate.RESUME_NAME, compile=True)
        runstate.check_same_run(saved, meta, folder, out / runstate.RESUME_NAME)
        state.update(saved["resume"])
        train_batches.epoch = state["epochs_done"]  # the order and augmentation of the next epoch, as if unbroken
        runstate.keep_log_rows_before(out / runstate.LOG_NAME, state["epochs_done"])
    else:
        crnn = new_model(network, charset, in_scope)
        finetune.set_cnn_trainable(crnn, not frozen_until)  # frozen first, with --freeze_cnn_epochs
        compile_for(0, frozen_until or epochs)
    describe_model(cfg, recipe, network, crnn)
    # ---- phase 5, training
    run_callbacks = callbacks.run_callbacks(
        out, meta, cfg, recipe, train_batches=train_batches, val_batches=val_batches, charset=charset,
        val_labels=[label for _, label in val_set], epochs_done=state["epochs_done"], best_score=state["best_score"],
        steps_left=(epochs - state["epochs_done"]) * len(train_batches), resumed=cfg.resume)
    started = time.time()
    callbacks.STOP.in_fit = True  # from here a first Ctrl-C or SIGTERM stops between steps
    try:
        trained = 0 if state["finished"] else fit_in_phases(
            crnn, train_batches, run_callbacks, first_epoch=state["epochs_done"], frozen_until=frozen_until,
            epochs=epochs, compile_for=compile_for)
    except KeyboardInterrupt:
        run_callbacks.resume.save()  # this epoch's progress too; the epoch itself runs again on resume
        print(f"\ninterrupted after {run_callbacks.resume.epochs_done} complete epochs; saved "
              f"{out / runstate.RESUME_NAME}. Continue with: python train.py --resume --out {out}")
        return None
    finally:  # (whatever ended fit(): a signal from here on stops at once)
        callbacks.STOP.in_fit = False
        train_batches.close()  # its worker processes, if any
    # ---- phase 6, the final model, then the best checkpoint scored on the test split
    train_seconds = max(time.time() - started, 1e-6)
    if not state["finished"]:
        model.save_model(crnn, out / runstate.FINAL_NAME, meta)
        run_callbacks.resume.save(finished=True)  # from here a stop leaves only the scoring to do again
    try:
        results = scoring.score_run(out, folder, cfg, charset, network.options, train_set, test_set, test_batches,
                            epochs_run=state["epochs_done"] + trained, trained=trained, train_seconds=train_seconds,
                            repeats=repeats)
    except KeyboardInterrupt:
        print(f"\ninterrupted while scoring; training is complete and saved in {out}. Score it with: "
              f"python train.py --resume --out {out}")
        return None
    (out / runstate.RESUME_NAME).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    return results


def main(argv=None):
    cfg = parse_config(argv)
    callbacks.STOP.reset()  # (main() may run more than once in a process: the tests call it)

    def on_signal(signum, frame):  # preemptible machines send SIGTERM first: stop as cleanly as on Ctrl-C
        callbacks.STOP.request(signum)

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
    return 0 if results is not None else 128 + (callbacks.STOP.signal or signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(main())
