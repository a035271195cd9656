"""Train the CRNN + CTC captcha reader.

    python train.py                         # built-in synthetic data (drawn once into data/synth)
    python train.py --data_dir path/to/imgs # your folder: labels from the file names (4721.png, 4721_md5.png, ...)
    python train.py --data_dir imgs --labels labels.csv   # numbered files and a labels file
    python train.py --data_dir imgs --unlabeled more_imgs # and the site's unlabelled captchas (selftrain.py)

Every field of TrainConfig below is a command-line flag. Writes into --out (default saved_model/):
crnn_ctc_best.keras (the run's model: the final epoch's, unless the epoch of lowest validation CER reads
validation better beyond chance; runscore.py), crnn_ctc_final.keras (last epoch), each with the confidence
threshold its readers apply, train_log.csv, metrics.json (the run's model on the held-out test split) and
three plots. Meanwhile crnn_ctc_resume.keras lets `python train.py --resume` continue after a crash or Ctrl-C.

A run, top to bottom (train()): 1. the data, 2. the network, recipe and pixels, 3. the batches and the plan,
4. the model on its devices (new, fine-tuned or resumed), 5. training, 6. the final model and the test score.
Callbacks and their order: callbacks.py; start models and freezing: finetune.py; run files: runstate.py.
"""

import sys

import precheck

if __name__ == "__main__":  # a folder or labels file that cannot train is refused before TensorFlow loads
    precheck.exit_on_bad_input(precheck.train_inputs)

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import quiet  # noqa: F401  (first: TensorFlow's start-up lines off; quiet.py)
import keras
import numpy as np

import arithmetic
import callbacks
import cli
import dataset
import finetune
import label_sources
import model
import modelmeta
import charsets
import imagefiles
import preprocess
import recipes
import runlength
import runstate
import runscore
import selftrain
import synth
import twin
from errors import CaptchaError


@dataclass
class TrainConfig:
    data_dir: str = ""  # folder of labelled images; empty: the built-in synthetic set
    synth_dir: str = "data/synth"  # the built-in set is drawn (once) into synth_dir/synth_style
    synth_style: str = "captcha"  # captcha (the `captcha` package), gregwar (like the Kaggle set), hershey or varied
    synth_count: int = 20000
    synth_seed: int = 1234
    init_from: str = "base"  # start from: base (the shipped pretrained model, for the fast preset and default
    #                          recipe), none (from scratch), or a .keras file; output rows are carried by symbol
    freeze_cnn_epochs: int = 0  # with init_from: train only the recurrent part and the output for this many epochs
    preset: str = "auto"  # the network (model.PRESETS): seed (the reference's), fast, kerasio, tiny (tests); auto: fast
    labels_from: str = "auto"  # where file names hold the label: auto (decided from all the names, refused when
    #                            unclear), name, prefix (LABEL_md5.png), suffix (ID_LABEL.png) or regex:PATTERN
    labels: str = ""  # a labels file instead: CSV/TSV file,label rows, a JSON or Python dict, or one label per line
    answer: str = "text"  # text, or arithmetic: the labels are expressions as drawn (3+5=?, in a labels file) and
    #                       readers give their value too (stored in the model; arithmetic.py)
    label_spaces: str = "auto"  # a space between symbols (CnOCR/PaddleOCR files: "降 飞 淀 惶"): auto (joined when every
    #                             label has one between each symbol; refused when mixed), join, keep (a symbol)
    case: str = "auto"  # letter case of the labels: keep, lower, upper (folded), auto (labels typed in one case
    #                     are folded to it, for sites that ignore case; mixed-case labels kept)
    charset: str = "auto"  # auto: the symbols the labels use; or a preset (default, digits, ...), the symbols, or a
    #                        file of one symbol per line (PaddleOCR/CnOCR dictionaries)
    max_len: int = 0  # longest label; 0: the longest in the data
    channels: int = 0  # 0 (auto): colour when the median image carries colour, else gray; 1: gray; 3: colour (the
    #                    gray base model's first convolution is widened to colour)
    height: int = 0  # the canvas images are resized and padded to; 0: the network's (50, or the start model's)
    width: int = 0  # 0: the network's (200), or wider for a folder whose median image is wider than the canvas
    limit: int = 0  # use at most this many images (0: all)
    unlabeled: str = ""  # a folder of the site's unlabelled captchas: self-training (selftrain.py) adds the
    #                      confident readings of each round's model to the next round's training images
    rounds: int = 0  # with --unlabeled: rounds of training with pseudo-labels after the round-0 (0: 2); with
    #                  --resume, more rounds for a finished or interrupted self-training run (0: its own)
    augmented_agreement: int = 0  # with --unlabeled: a student's reading becomes a pseudo-label only where this many
    #                               augmented copies of the image read the same (0: off); with --resume, from the
    #                               next round's pseudo-labels on
    teacher: str = ""  # with --unlabeled: ddddocr or a model file (.keras, .onnx, .tflite) whose filtered readings
    #                    of the unlabelled images are round 0's pseudo-labels (teacher.py); --data_dir is optional
    check: str = ""  # a folder of images labelled by people (labels read as --labels_from, or --check_labels), half
    #                  the validation and half the test split instead of a split of --data_dir (all of it trains)
    check_labels: str = ""  # a labels file for --check
    unlabeled_labels: str = ""  # a labels file for --unlabeled whose colour column gives the colour each captcha asks
    #                             for (its label column may be empty: only the colours are read)
    recipe: str = "default"  # optimizer and schedule: default (AdamW, one-cycle), reference, kerasio (recipes.RECIPES)
    # Settings left unset (None) take the recipe's value.
    epochs: int | None = None  # a fixed length in passes over the training images; unset: the run trains as long as
    #                            its validation pays (runlength.py), at most 30 passes or 3,000 steps
    min_steps: int = 0  # a fixed length instead: 30 passes, or more on a small folder so that training makes at
    #                     least this many optimizer steps (0: unset)
    minutes: float = 0  # a time budget for a run that follows its validation: its peak is held no longer than
    #                     leaves time for the anneal, and it ends within it (0: none; counted from this session's start)
    check_every: int | None = None  # a run that follows its validation validates every this many steps (the
    #                                 recipe's: 50)
    augment: str | None = None  # on-the-fly training augmentation: none, light, strong (the recipe's: light or none)
    clean_finish: float | None = None  # the last fraction of the epochs without augmentation (the recipe's: 0.25)
    ema_momentum: float | None = None  # evaluate and save a moving average of the weights, e.g. 0.995 (0: off;
    #                                    the recipes': off)
    batch_size: int | None = None  # the recipe's: 32 (default), 128 (reference), 16 (kerasio)
    learning_rate: float | None = None  # the recipe's (the peak, for one-cycle)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    target_precision: float = 0.99  # the model stores the confidence above which its validation readings are right
    #                                 this often; readers mark readings below it low_confidence
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
    """The folder to train on: the user's, none (a teacher's pseudo-labels and a check folder alone), or the
    built-in synthetic set (drawn on first use)."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if cfg.check:
        return None
    folder = Path(cfg.synth_dir) / cfg.synth_style
    have = len(imagefiles.list_images(folder)) if folder.is_dir() else 0
    if have < cfg.synth_count:
        print(f"drawing {cfg.synth_count - have} synthetic captchas into {folder} (cached for later runs)")
        synth.generate_synthetic(folder, cfg.synth_count - have, synth.Drawing(style=cfg.synth_style), seed=cfg.synth_seed + have)
    return folder


def check_config(cfg):
    """Settings that would fail only after training, refused before it."""
    if cfg.channels not in (0, *preprocess.CHANNELS):
        raise CaptchaError(f"--channels {cfg.channels}: 0 (auto), 1 (gray) or 3 (colour)")
    arithmetic.check_answer(cfg.answer)
    if not 0 < cfg.target_precision <= 1:
        raise CaptchaError(f"--target_precision {cfg.target_precision:g}: a share of right readings, in (0, 1]")


def scan_labelled(cfg, folder, labels_file=None, source=None):
    """One folder's labelled images (labels read by --labels_from / `labels_file`, or by a resumed run's stored
    `source`), refused when there are none."""
    fixed_charset = None if cfg.charset == "auto" else charsets.charset_from_arg(cfg.charset)
    labels = source or label_sources.LabelSource.given(cfg.labels_from, labels_file, cfg.label_spaces)
    scan = dataset.scan_folder(folder, fixed_charset, cfg.max_len or None, labels, case=cfg.case, channels=cfg.channels)
    if scan.decision:
        print(scan.decision)
    print(f"{folder}: {scan.summary()}")
    if cfg.verbose and scan.skipped:
        print("\n".join(scan.skipped_lines()))
    if not scan.samples:
        raise CaptchaError(f"{folder}: no usable labelled images ({scan.summary()})")
    if not cfg.channels:
        print(scan.channels()[1])
    return scan


def load_dataset(cfg, folder, source=None, pseudo=()):
    """Scan, split, and pick charset and label length (over the pseudo-labels too). With --check, its images are
    the validation and test split and --data_dir's (if any) all train. Returns (charset, max_len, train, val, test,
    scan, asked), scan being the check folder's with --check, asked {path: the colour its captcha asks for} (a labels
    file's colour column; empty: images read as they are)."""
    if cfg.check:
        scan = scan_labelled(cfg, Path(cfg.check), cfg.check_labels, source)
        val, test = dataset.split_in_two(scan.samples, cfg.seed)
        train_scan = scan_labelled(cfg, folder, cfg.labels) if folder else None
        train = train_scan.samples if train_scan else []
        asked = {**scan.asked, **(train_scan.asked if train_scan else {})}
    else:
        scan = scan_labelled(cfg, folder, cfg.labels, source)
        samples = scan.samples
        if cfg.limit:
            samples = [samples[i] for i in np.random.default_rng(cfg.seed).permutation(len(samples))[: cfg.limit]]
        train, val, test = dataset.split_samples(samples, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        asked = scan.asked
    asked = {**asked, **selftrain.pseudo_asked(cfg.unlabeled, cfg.unlabeled_labels, pseudo)}
    without = [path for path, _ in train + val + test + list(pseudo) if asked and path not in asked]
    if without:
        raise CaptchaError(f"{without[0]}: no colour asked for, though {len(asked)} images have one; give every "
                           f"folder's images a labels file with a colour column, or none")
    labels = [label for _, label in train + val + test] + [label for _, label in pseudo]
    charset = charsets.charset_for_labels(cfg.charset, labels)
    max_len = cfg.max_len or max(len(label) for label in labels)
    print(f"charset: {len(charset.symbols)} symbols + blank; labels up to {max_len} characters; letter case: "
          f"{scan.case}" + (" (folded)" if scan.case != "keep" else "")
          + f"; split {len(train)} train / {len(val)} val / {len(test)} test"
          + (f" (validation and test: {cfg.check})" if cfg.check else ""))
    if asked:
        print(f"asked colours: {', '.join(sorted(set(asked.values())))}: each image is read with the colour it asks "
              f"for, one input plane per colour")
    return charset, max_len, train, val, test, scan, asked


def resolve_recipe(cfg):
    return recipes.with_flags(cfg.recipe, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                              check_every=cfg.check_every,
                              augment=cfg.augment, settle_epochs=cfg.settle_epochs, clean_finish=cfg.clean_finish,
                              ema_momentum=cfg.ema_momentum, patience=cfg.patience)


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
            return model.build_model(network.config, charset.num_classes, network.options.canvas)
        crnn, fresh = finetune.start_from(*network.start, charset, network.config, network.options)
    print(f"starting from {network.init_from}" + (f"; output rows for new symbols start untrained: {fresh}"
                                                  if fresh else " (every symbol's output row carried over)"))
    return crnn


def resumed_model(out, meta, folder, in_scope, state):
    """The interrupted run's model with its optimizer state; `state` gets where training stood."""
    with in_scope():
        crnn, saved = model.load_model(out / runstate.RESUME_NAME, compile=True)
    runstate.check_same_run(saved, meta, folder, out / runstate.RESUME_NAME)
    state.update(saved["resume"])
    runstate.keep_log_rows_before(out / runstate.LOG_NAME, state["epochs_done"])
    return crnn


def describe_model(cfg, recipe, network, crnn, length):
    schedule = {"onecycle": "peak held, then annealed:" if length.follows_validation else "one-cycle peak",
                "plateau": "halved on plateau from", "constant": "constant"}[recipe.schedule]
    architecture = f"as {network.init_from}" if network.init_from else f"preset {cfg.preset}, from scratch"
    canvas = network.options.canvas
    print(f"model: {architecture}, {crnn.count_params():,} parameters, input {canvas.width}x{canvas.height} "
          f"{'colour' if canvas.channels == 3 else 'gray'}"
          + (f" and {len(canvas.colours)} asked-colour planes" if canvas.colours else "")
          + f", {network.steps} time steps; "
          f"recipe {cfg.recipe}: {recipe.optimizer}, {schedule} {recipe.learning_rate:g}, batch {recipe.batch_size}"
          + (f"; read and saved: the weights' moving average (momentum {recipe.ema_momentum:g})"
             if recipe.ema_momentum else ""))


def resume_config(cfg):
    """The interrupted run's own settings and label source, read from its resume checkpoint in --out."""
    path = Path(cfg.out) / runstate.RESUME_NAME
    meta = modelmeta.read_meta(path) if path.exists() else None
    if meta is None or "resume" not in meta:
        raise CaptchaError(f"{path}: no interrupted run to resume in {cfg.out}")
    saved = meta["resume"]["config"]
    print(f"resuming the run in {cfg.out} after epoch {meta['resume']['epochs_done']} with its saved settings")
    source = label_sources.LabelSource.from_dict(meta["labels"]) if "labels" in meta else None
    return cli.restored(TrainConfig, saved, out=cfg.out, resume=True), source


def train(cfg, pseudo=(), resume_command=None):
    """One run. pseudo: (path, label) pairs read by a model (self-training), added to the training split only.
    resume_command: what continues this run once stopped (for a self-training round or a pre-training, their own
    script's `--resume`; by default `python train.py --resume --out OUT`)."""
    resume_command = resume_command or f"python train.py --resume --out {cfg.out}"
    # ---- phase 1, the data: the folder (or the interrupted run's own settings), charset, label length, split
    source = None
    if cfg.resume:  # the run's own settings, and its labels read as they were (the same labels file, unchanged)
        cfg, source = resume_config(cfg)
    check_config(cfg)
    folder = resolve_data(cfg)
    if not cfg.data_dir and not cfg.check and not cfg.limit:  # the cache may hold more than this run asked for
        cfg = dataclasses.replace(cfg, limit=cfg.synth_count)
    charset, max_len, train_set, val_set, test_set, scan, asked = load_dataset(cfg, folder, source, pseudo)
    folder = folder or Path(cfg.check)  # what the run's files name as its data
    typed_lengths = [len(label) for _, label in train_set + val_set]  # by people: what a pseudo-label may be
    train_set = selftrain.with_pseudo_labels(train_set, val_set, test_set, pseudo)  # to the training split only
    # ---- phase 2, the network, the recipe and the pixels
    recipe = resolve_recipe(cfg)
    network = finetune.resolve_network(cli.section(cfg, finetune.NetworkFlags), recipe, scan, max_len,
                                       colours=sorted(set(asked.values())))
    meta = {**modelmeta.make_meta(charset, max_len, network.options, network.config), "labels": scan.source.to_dict(),
            "case": scan.case, "label_lengths": [min(typed_lengths), max(typed_lengths)], "answer": cfg.answer,
            "run": runstate.run_identity(folder, train_set, val_set, test_set)}
    # ---- phase 3, the batches and how many updates: a fixed length, or as long as validation pays (runlength.py)
    length_flags = cli.section(cfg, runlength.LengthFlags)
    length = runlength.plan(length_flags, recipe, len(train_set))
    epochs = length.epochs
    batching = dataset.Batching(network.options, recipe.batch_size, shuffle=True, seed=cfg.seed, augment=recipe.augment,
                                repeats=length.repeats, epoch_steps=length.epoch_steps,
                                augment_epochs=length.augment_epochs, asked=asked)
    train_batches, val_batches, test_batches = dataset.split_batches(
        (train_set, val_set, test_set), charset, max_len, batching, dataset.Loading(cfg.workers, cfg.processes,
                                                                                    cfg.cache_mb))
    check_set = val_set[: recipe.check_images] if length.follows_validation else val_set  # what each check reads
    check_batches = val_batches if len(check_set) == len(val_set) else dataset.make_batches(
        check_set, charset, max_len, batching.for_reading(), workers=cfg.workers, in_memory=True)
    print(runlength.describe(length_flags, recipe, length, len(train_batches), len(check_set)))
    # ---- phase 4, the model on its devices: new, fine-tuned from another model, or resumed with its optimizer
    keras.utils.set_random_seed(cfg.seed)
    in_scope = device_scope(cfg, recipe)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    frozen_until = cfg.freeze_cnn_epochs if network.init_from else 0

    def compile_for(first_epoch, last_epoch):  # total_steps None: the peak held, for a run that follows validation
        with in_scope():
            recipes.compile_model(crnn, charset, recipe, total_steps=None if length.follows_validation
                                  else (last_epoch - first_epoch) * len(train_batches))

    state = {"epochs_done": 0, "best_score": np.inf, "finished": False, "anneal": {}}
    if cfg.resume:  # compiled as saved: its optimizer state, and its frozen layers
        crnn = resumed_model(out, meta, folder, in_scope, state)
        train_batches.epoch = state["epochs_done"]  # the order and augmentation of the next epoch, as if unbroken
        if state["anneal"].get("from_epoch") is not None:  # stopped within the anneal
            runlength.start_anneal(crnn, train_batches, recipe, state["anneal"], length)
    else:
        crnn = new_model(network, charset, in_scope)
        finetune.set_cnn_trainable(crnn, not frozen_until)  # frozen first, with --freeze_cnn_epochs
        compile_for(0, frozen_until or epochs)
    describe_model(cfg, recipe, network, crnn, length)
    # ---- phase 5, training
    check_labels = [label for _, label in check_set]
    start = callbacks.RunStart(state["epochs_done"], state["best_score"],
                               steps_left=(epochs - state["epochs_done"]) * len(train_batches), resumed=cfg.resume,
                               settle_from=length.augment_epochs)
    run_callbacks = callbacks.run_callbacks(
        out, meta, dataclasses.asdict(cfg), recipe, train_batches,
        callbacks.Validation(check_batches, charset, check_labels), start,
        hold=runlength.hold_callback(length_flags, recipe, length, check_labels, state["anneal"], out, cfg.resume))
    started = time.time()
    callbacks.STOP.in_fit = True  # from here a first Ctrl-C or SIGTERM stops between steps
    try:
        if state["finished"]:
            trained = 0
        elif length.follows_validation:
            trained = runlength.fit(crnn, train_batches, run_callbacks, first_epoch=state["epochs_done"],
                                    length=length, recipe=recipe, anneal=state["anneal"])
        else:
            trained = finetune.fit_in_phases(crnn, train_batches, run_callbacks, first_epoch=state["epochs_done"],
                                             frozen_until=frozen_until, epochs=epochs, compile_for=compile_for)
    except KeyboardInterrupt:
        run_callbacks.resume.save()  # this epoch's progress too; the epoch itself runs again on resume
        print(f"\ninterrupted after {run_callbacks.resume.epochs_done} complete epochs; saved "
              f"{out / runstate.RESUME_NAME}. Continue with: {resume_command}")
        return None
    finally:  # (whatever ended fit(): a signal from here on stops at once)
        callbacks.STOP.in_fit = False
        train_batches.close()  # its worker processes, if any
    # ---- phase 6, the final model, the run's model chosen on validation, and its test score
    epochs_run = state["epochs_done"] + trained
    print(f"trained {epochs_run * len(train_batches)} steps in all, {(time.time() - started) / 60:.1f} min in this "
          f"session")
    if not state["finished"]:
        model.save_model(crnn, out / runstate.FINAL_NAME, meta)
        run_callbacks.resume.save(finished=True)  # from here a stop leaves only the scoring to do again
    try:
        chosen = runscore.choose_run_model(out, val_set, val_batches, charset, cfg.target_precision,
                                          prefer_final=recipe.schedule == "onecycle")
        images_per_epoch = (len(train_batches) * recipe.batch_size if length.follows_validation
                            else len(train_set) * length.repeats)
        record = runscore.RunRecord(folder, dataclasses.asdict(cfg), epochs_run, trained, time.time() - started,
                                   images_per_epoch, steps_run=epochs_run * len(train_batches))
        results = runscore.score_run(out, chosen, record, charset, network.options, val_set, test_set, test_batches)
    except KeyboardInterrupt:
        print(f"\ninterrupted while scoring; training is complete and saved in {out}. Score it with: "
              f"{resume_command}")
        return None
    (out / runstate.RESUME_NAME).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    twin.write_twin(out / runstate.BEST_NAME)  # test.py and serve.py then read the run's model without TensorFlow
    return results


def train_round(settings, pseudo=(), resume_command=None):
    """One round of a self-training run: a run of its `settings` (every flag, as the run stored them)."""
    return train(cli.restored(TrainConfig, settings), pseudo, resume_command)


def main(argv=None):
    cfg = parse_config(argv)
    try:
        if not cfg.resume:
            precheck.teacher_reads_unlabeled(cfg.teacher, cfg.unlabeled)
        with callbacks.stop_on_signals():
            self_training = cfg.unlabeled or (cfg.resume and (Path(cfg.out) / selftrain.STATE_NAME).exists())
            results = selftrain.run(dataclasses.asdict(cfg), train_round) if self_training else train(cfg)
    except CaptchaError as e:
        return cli.user_error(e)
    return 0 if results is not None else callbacks.stopped_status()


if __name__ == "__main__":
    sys.exit(main())
