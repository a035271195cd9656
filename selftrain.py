"""Self-training: a site's unlabelled captchas, read by the model, and the confident readings trained on.

    python train.py --data_dir LABELLED --unlabeled UNLABELLED        # rounds in --out/round_0, round_1, ...
    python train.py --resume --out saved_model                        # an interrupted self-training run
    python train.py --resume --out saved_model --rounds 4             # a finished one, two rounds more
    python train.py ... --augmented_agreement 3                       # kept only where 3 altered copies agree

Round 0 trains on the labelled images alone. After each round, its model (the one train.py kept) reads the
unlabelled images; readings at or above the confidence threshold it stores (chosen on its validation split for
--target_precision), and within the lengths of the labels people typed, become pseudo-labels, written to
--out/pseudo_labels_round_N.csv for a person to check (with --augmented_agreement N, only the readings that N
copies of the image, altered by the light training augmentation, read the same), and round N trains again, from
round N-1's model, on the labelled training images plus those, for as long as its validation pays. Validation and
test stay the labelled images' own splits (train.py adds pseudo-labels to the training split only, and drops any
unlabelled file that is a copy of a labelled one), so every round is chosen and scored on labels people typed.
Rounds go on up to --rounds, and end earlier once a round's pseudo-labels would barely change (fewer than
MIN_CHANGED_FRACTION of the unlabelled images newly labelled, relabelled or no longer labelled). The last round is
copied to --out as the run's result, unless an earlier round reads the validation images better beyond chance (an
exact sign test on the images only one of them reads right).
"""

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import typing
import zlib
from pathlib import Path

import numpy as np

import augment
import dataset
import label_sources
import metrics
import model
import charsets
import imagefiles
import reader
import runstate
import twin
from errors import CaptchaError

STATE_NAME = "self_training.json"
TEACHER_READINGS_NAME = "teacher_readings.csv"  # every reading of the teacher's, before the filters
TEACHER_CHECK_NAME = "teacher_check.csv"  # with no --check: the teacher's readings held out as validation and test
TEACHER_CHECK_SHARE, MIN_TEACHER_CHECK = 0.1, 20
DEFAULT_ROUNDS = 2
MIN_CHANGED_FRACTION = 0.05  # fewer added, changed or dropped pseudo-labels than this share of the folder: no further round
RESULT_FILES = (runstate.BEST_NAME, twin.twin_path(runstate.BEST_NAME).name, runstate.FINAL_NAME,
                runstate.LOWEST_VAL_NAME, runstate.LOG_NAME, "metrics.json", "training_curves.png", "predictions.png",
                "confusions.png")


def round_dir(out, number):
    return Path(out) / f"round_{number}"


def pseudo_labels_path(out, number):
    return Path(out) / f"pseudo_labels_round_{number}.csv"


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def without_labelled_copies(pseudo, labelled):
    """The pseudo-labelled (path, label) pairs whose files are not byte-for-byte copies of a labelled image's:
    a copy of a validation or test image would leak it into training. Returns (kept, dropped count)."""
    labelled_digests = {file_digest(path) for path, _ in labelled}
    kept = [(path, label) for path, label in pseudo if file_digest(path) not in labelled_digests]
    return kept, len(pseudo) - len(kept)


def with_pseudo_labels(train_set, val_set, test_set, pseudo):
    """The training split with the pseudo-labelled images added (those that are not copies of labelled ones)."""
    if not pseudo:
        return train_set
    kept, copies = without_labelled_copies(pseudo, train_set + val_set + test_set)
    print(f"training split: {len(train_set)} labelled + {len(kept)} pseudo-labelled images"
          + (f" ({copies} unlabelled files are copies of labelled images: left out)" if copies else ""))
    return train_set + kept


def read_pseudo_labels(path):
    with open(path, newline="") as f:
        return [(row["path"], row["label"]) for row in csv.DictReader(f)]


def write_pseudo_labels(path, readings):
    """readings: (path, text, confidence) rows, written atomically (a resume reads either all or none)."""
    tmp = Path(path).with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "confidence"])
        writer.writerows([path, text, f"{confidence:.6g}"] for path, text, confidence in readings)
    os.replace(tmp, path)


def changed_pseudo_labels(before, after):
    """How many images the pseudo-labels `after` label otherwise than `before`: newly, differently, or no longer
    (a label the better model drops is more often a wrong one, so training without it is a change too)."""
    before_labels = {str(path): label for path, label in before}
    after_labels = {str(path): label for path, label in after}
    return sum(before_labels.get(path) != after_labels.get(path) for path in before_labels.keys() | after_labels.keys())


class PseudoLabels(typing.NamedTuple):
    kept: list  # (path, text, confidence) rows
    unreadable: int  # files that could not be read
    wrong_length: int  # readings of a length no typed label has
    known_wrong: int  # readings the site rejected
    unsteady: int  # readings an augmented copy read otherwise


def augmentation_for(seed, copy):
    """path -> the light training augmentation, seeded by (seed, copy, the file's name): a copy of an image is
    altered the same way whatever the order or batch it is read in."""
    def for_path(path):
        rng = np.random.default_rng([seed, copy, zlib.crc32(Path(path).name.encode())])
        return lambda canvas: augment.augment(canvas, "light", rng)
    return for_path


@dataclasses.dataclass(frozen=True)
class SelfTrainingFlags:
    """The flags a self-training run reads (train.py's of the same names: cli.section). The rounds themselves
    train with every setting of the run, which this module passes on without reading (`settings` below)."""

    unlabeled: str = ""
    unlabeled_labels: str = ""  # the unlabelled images' asked colours
    rounds: int = 0
    augmented_agreement: int = 0
    teacher: str = ""
    check: str = ""
    check_labels: str = ""
    data_dir: str = ""
    labels_from: str = "auto"  # how the check folder's labels are read
    label_spaces: str = "auto"
    case: str = "auto"
    init_from: str = "base"  # round 0's start
    seed: int = 42
    target_precision: float = 0.99
    out: str = "saved_model"
    resume: bool = False


def flags_of(settings):
    """The SelfTrainingFlags of a run's settings (a dict of every flag; one an older release did not save: its
    default)."""
    return SelfTrainingFlags(**{f.name: settings.get(f.name, f.default) for f in dataclasses.fields(SelfTrainingFlags)})


def unlabeled_colours(folder, labels_file):
    """{path: the colour it asks for} of the unlabelled images of `folder` (--unlabeled_labels' colour column), or
    {} without a labels file."""
    if not labels_file:
        return {}
    asked = label_sources.asked_colours(folder, labels_file)
    if not asked:
        raise CaptchaError(f"--unlabeled_labels {labels_file}: no colour for any image of {folder} (a header row "
                           f"file,label,colour and a colour on each row)")
    return asked


def pseudo_asked(folder, labels_file, pseudo):
    """{path: the colour it asks for} of the pseudo-labelled images, for a run whose images ask for one."""
    if not pseudo or not labels_file:
        return {}
    asked = unlabeled_colours(folder, labels_file)
    return {path: asked[path] for path, _ in pseudo if path in asked}


def pseudo_label(model_path, paths, teacher_texts=None, rejected=None, augmented_copies=0, seed=0, asked=None):
    """Reads `paths` (with the colours they ask for, `asked`) with the model at `model_path` and selects its
    pseudo-labels (select_pseudo_labels)."""
    captcha_reader = reader.Reader(model_path)
    return select_pseudo_labels(captcha_reader, captcha_reader.read_paths(paths, asked=asked), teacher_texts, rejected,
                                augmented_copies, seed, asked)


def select_pseudo_labels(captcha_reader, readings, teacher_texts=None, rejected=None, augmented_copies=0, seed=0,
                         asked=None):
    """Of `readings` (captcha_reader's Readings), keeps the readings at or above its stored threshold that the
    network read at a length of the labels people typed (a 5-letter site's 4-letter reading is wrong however
    confident: CTC merged or dropped a symbol; its refit to 5 letters is a guess). teacher_texts {path: texts}: a
    reading below the threshold is kept too where one of the teacher's readers read the same text (two readers of
    different make agree). rejected {file name: text}: readings the site said were wrong (serve.py --collect), never
    kept. augmented_copies N: a reading is kept only where N copies of the image, each altered by the light training
    augmentation, read the same (a confident reading that a small turn or blur changes is more often wrong).
    Returns PseudoLabels."""
    low_rule = captcha_reader.low_confidence_rule()
    teacher_texts = teacher_texts or {}

    def teacher_agrees(reading):
        return reading.text in {charsets.fold_case(text, captcha_reader.case) if captcha_reader.case else text
                                for text in teacher_texts.get(reading.path, ())}

    rejected = {name: charsets.fold_case(text, captcha_reader.case) for name, text in (rejected or {}).items()}
    kept, unreadable, wrong_length, known_wrong = [], 0, 0, 0
    for reading in readings:
        if reading.error:
            unreadable += 1
        elif not low_rule.read_at_typed_length(reading.text, reading.refit):
            wrong_length += 1
        elif reading.text == rejected.get(Path(reading.path).name):  # a rejected text is never empty
            known_wrong += 1
        elif reading.text and (reading.confidence >= low_rule.threshold or teacher_agrees(reading)):
            kept.append((reading.path, reading.text, reading.confidence))
    steady = steady_readings(captcha_reader, kept, augmented_copies, seed, asked)
    return PseudoLabels(steady, unreadable, wrong_length, known_wrong, len(kept) - len(steady))


def steady_readings(captcha_reader, kept, copies, seed, asked=None):
    """The (path, text, confidence) rows of `kept` that `copies` altered copies of the image (augmentation_for)
    also read as `text`."""
    for copy in range(copies):
        readings = captcha_reader.read_paths([path for path, _, _ in kept], augmentation_for=augmentation_for(seed, copy),
                                             asked=asked)
        kept = [row for row, reading in zip(kept, readings) if reading.text == row[1]]
    return kept


def read_teacher_texts(out):
    """{path: the teacher's texts of it, as read (one per reader)} from a run's teacher_readings.csv."""
    with open(Path(out) / TEACHER_READINGS_NAME, newline="") as f:
        return {row["path"]: {text for text in (row["text"], row["second"]) if text} for row in csv.DictReader(f)}


def teach(flags, out, unlabeled):
    """The teacher reads every unlabelled image (all its readings: teacher_readings.csv); the filtered ones
    (teacher.filter_readings: the check labels' case, lengths and symbols, else typical ones) become round 0's
    pseudo-labels. With no check folder, a seeded TEACHER_CHECK_SHARE of them is held out as the check split."""
    import teacher as teachers  # ddddocr, when asked for, loads only here

    source = teachers.load_teacher(flags.teacher)
    case, lengths, symbols = (flags.case if flags.case in ("lower", "upper", "keep") else "lower"), None, None
    threshold = getattr(source, "threshold", None)
    if flags.check:
        found = dataset.scan_folder(Path(flags.check), labels=label_sources.LabelSource.given(
            flags.labels_from, flags.check_labels, flags.label_spaces), case=flags.case, verify=False)
        if not found.samples:
            raise CaptchaError(f"--check {flags.check}: no labelled images ({found.summary()})")
        check_labels = [label for _, label in found.samples]
        case, lengths, symbols = found.case, {len(s) for s in check_labels}, set("".join(check_labels))
        truth = {str(path): label for path, label in found.samples}
        check_readings = list(source.read_paths([path for path, _ in found.samples], asked=found.asked))
        threshold, measured = teachers.check_threshold(check_readings, truth, case, lengths, symbols)
        print(measured)
    print(f"teacher: {source.readers_described} reads {len(unlabeled)} unlabelled images")
    asked = unlabeled_colours(flags.unlabeled, flags.unlabeled_labels)
    readings = list(source.read_paths(unlabeled, asked=asked))
    with open(out / TEACHER_READINGS_NAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text", "second", "confidence"])
        writer.writerows([r.path, r.text, "" if r.second is None else r.second,
                          "" if r.confidence is None else f"{r.confidence:.6g}"] for r in readings)
    filtered = teachers.filter_readings(readings, case, lengths, symbols, threshold)
    print(f"teacher: {filtered.describe(len(readings))}; all readings in {out / TEACHER_READINGS_NAME}")
    kept = filtered.kept
    if not flags.check:
        order = np.random.default_rng(flags.seed).permutation(len(kept))
        held = max(MIN_TEACHER_CHECK, round(TEACHER_CHECK_SHARE * len(kept)))
        if len(kept) < 2 * held:
            raise CaptchaError(f"--teacher {flags.teacher}: only {len(kept)} readings pass the filters, too few to hold "
                               f"{held} out for checking and train on the rest; give --check a labelled folder")
        colour = ["colour"] if asked else []  # the held-out images are read with their colours too
        with open(out / TEACHER_CHECK_NAME, "w", newline="") as f:
            csv.writer(f).writerows([["file", "label", *colour]] + [
                [os.path.relpath(kept[i][0], flags.unlabeled), kept[i][1], *([asked[kept[i][0]]] if asked else [])]
                for i in sorted(order[:held])])
        kept = [kept[i] for i in sorted(order[held:])]
    if not kept:
        raise CaptchaError(f"--teacher {flags.teacher}: no reading passed the filters ({filtered.describe(len(readings))})")
    write_pseudo_labels(pseudo_labels_path(out, 0), [(path, label, 1.0) for path, label in kept])


def round_summary(number, out, added):
    """One line of the self-training log: what round `number` trained on and how its model (the one train.py
    kept) reads the validation images."""
    results = json.loads((round_dir(out, number) / "metrics.json").read_text())
    val = results["val_readings"]
    on_val = metrics.score([r["prediction"] for r in val], [r["truth"] for r in val])
    abstain = results["abstain"]
    return {"round": number, "pseudo_labels": added, "val_cer": on_val["cer"],
            "val_exact_match": on_val["exact_match"], "test_exact_match": results["test"]["exact_match"],
            "threshold": abstain["threshold"], "threshold_val_precision": abstain["val_precision"],
            "threshold_val_coverage": abstain["val_coverage"]}


def describe_round(summary):
    precision = summary["threshold_val_precision"]
    return (f"self-training round {summary['round']}: {summary['pseudo_labels']} pseudo-labelled images added; its "
            f"model reads validation at CER {summary['val_cer']:.4f}, exact match {summary['val_exact_match']:.4f}; "
            f"its threshold "
            + ("reached no precision" if summary["threshold"] is None else
               f"{summary['threshold']:.4g} kept {summary['threshold_val_coverage']:.1%} of validation at precision "
               f"{precision:.4f}"))


def start_state(settings):
    """The run's settings (a dict of every flag): saved at a fresh start (earlier rounds in --out are removed), read
    on --resume, with a --rounds or --augmented_agreement given then over the saved ones."""
    cfg = flags_of(settings)
    out = Path(cfg.out)
    state_path = out / STATE_NAME
    if cfg.rounds < 0:
        raise CaptchaError(f"--rounds {cfg.rounds}: at least 1 round with pseudo-labels (0: {DEFAULT_ROUNDS})")
    if cfg.augmented_agreement < 0:
        raise CaptchaError(f"--augmented_agreement {cfg.augmented_agreement}: a number of augmented copies, 0 or more")
    if cfg.resume:
        if not state_path.exists():
            raise CaptchaError(f"{state_path}: no self-training run to resume in {out}")
        state = json.loads(state_path.read_text())
        saved = state["config"]
        print(f"resuming the self-training run in {out} with its saved settings")
        for name, given in (("rounds", cfg.rounds), ("augmented_agreement", cfg.augmented_agreement)):
            # settings of the rounds still to come: a finished run goes on where it ended (or stops sooner), and
            # its next pseudo-labels are filtered as asked
            if given and given != saved.get(name):
                print(f"--{name} {given} over the run's {saved.get(name, 0)}: rounds done are kept, later ones "
                      f"trained with it")
                saved = {**saved, name: given}
                state_path.write_text(json.dumps({**state, "config": saved}, indent=2))
        return {**saved, "out": cfg.out, "resume": True}
    if not Path(cfg.unlabeled).is_dir():
        raise CaptchaError(f"--unlabeled {cfg.unlabeled}: not a folder")
    if not cfg.teacher and not cfg.data_dir:
        raise CaptchaError("--unlabeled needs labelled images (--data_dir) or a --teacher to read them first")
    if cfg.check and not Path(cfg.check).is_dir():
        raise CaptchaError(f"--check {cfg.check}: not a folder")
    settings = {**settings, "rounds": cfg.rounds or DEFAULT_ROUNDS}
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("round_*"), *out.glob("pseudo_labels_round_*.csv")]:
        print(f"removing the earlier run's {old}")
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    state_path.write_text(json.dumps({"config": settings, "rounds": []}, indent=2))
    return settings


def run(settings, train_one):
    """Self-training rounds. `settings`: every flag of the run, as a dict (this module reads its SelfTrainingFlags
    and hands the rest on); `train_one(settings, pseudo, resume_command)` trains one round with them (train.py's).
    Returns the chosen round's results (its metrics, with the rounds' log), or None if interrupted (resumable)."""
    settings = start_state(settings)
    cfg = flags_of(settings)
    out = Path(cfg.out)
    unlabeled = imagefiles.list_images(cfg.unlabeled)
    if not unlabeled:
        raise CaptchaError(f"--unlabeled {cfg.unlabeled}: no image files (png, jpg, bmp, webp, gif, tif)")
    print(f"self-training: {len(unlabeled)} unlabelled images in {cfg.unlabeled}, up to {cfg.rounds} rounds with "
          f"pseudo-labels at precision {cfg.target_precision:g} on validation")
    rejected = label_sources.rejected_readings(cfg.unlabeled)
    if rejected:
        print(f"{len(rejected)} readings the site rejected ({Path(cfg.unlabeled) / label_sources.REJECTED_READINGS_NAME})"
              f": never a pseudo-label")
    teacher_texts = {}
    if cfg.teacher:  # round 0 trains on the teacher's filtered readings
        if not pseudo_labels_path(out, 0).exists():
            teach(cfg, out, unlabeled)
        teacher_texts = read_teacher_texts(out)
        if not cfg.check:  # the teacher's held-out readings are the check split: agreement, not accuracy
            print(f"no --check folder: the run cannot measure itself. Validation and test are {TEACHER_CHECK_NAME}, "
                  f"readings held out from training; their scores are agreement with the teacher, not accuracy, "
                  f"and the result stores no confidence threshold")
            settings = {**settings, "check": cfg.unlabeled, "check_labels": str(out / TEACHER_CHECK_NAME)}
            cfg = flags_of(settings)
    summaries = []
    for number in range(cfg.rounds + 1):
        pseudo = read_pseudo_labels(pseudo_labels_path(out, number)) if number or cfg.teacher else []
        folder = round_dir(out, number)
        if not (folder / "metrics.json").exists():
            resumable = (folder / runstate.RESUME_NAME).exists()
            print(f"---- self-training round {number}: {'resumed' if resumable else 'started'}, {len(pseudo)} "
                  f"pseudo-labelled images" + (" beside the labelled ones" if cfg.data_dir else "")
                  + (f"; it starts from round {number - 1}'s model" if number else ""))
            # a round builds on the last: it starts from the previous round's model, which already reads the site,
            # and trains as long as its own validation pays (runlength.py); round 0 starts as the run was told
            start = str(round_dir(out, number - 1) / runstate.BEST_NAME) if number else cfg.init_from
            round_settings = {**settings, "out": str(folder), "resume": resumable, "init_from": start}
            if train_one(round_settings, pseudo=pseudo, resume_command=f"python train.py --resume --out {out}") is None:
                return None
        summaries.append(round_summary(number, out, len(pseudo)))
        print(describe_round(summaries[-1]))
        state = json.loads((out / STATE_NAME).read_text())
        (out / STATE_NAME).write_text(json.dumps({**state, "rounds": summaries}, indent=2))
        if number == cfg.rounds:
            break
        next_labels = pseudo_labels_path(out, number + 1)
        if not next_labels.exists():
            found = pseudo_label(folder / runstate.BEST_NAME, unlabeled, teacher_texts, rejected,
                                 cfg.augmented_agreement, cfg.seed, unlabeled_colours(cfg.unlabeled, cfg.unlabeled_labels))
            write_pseudo_labels(next_labels, found.kept)
            print(f"round {number}'s model pseudo-labels {len(found.kept)} of {len(unlabeled)} unlabelled images"
                  + (f"; {found.wrong_length} reading{'s' if found.wrong_length != 1 else ''} of a length no typed "
                     "label has left out" if found.wrong_length else "")
                  + (f"; {found.known_wrong} the site rejected left out" if found.known_wrong else "")
                  + (f"; {found.unsteady} that an augmented copy read otherwise left out" if found.unsteady else "")
                  + (f"; {found.unreadable} could not be read" if found.unreadable else "") + f"; wrote {next_labels}")
        changed = changed_pseudo_labels(pseudo, read_pseudo_labels(next_labels))
        if changed < MIN_CHANGED_FRACTION * len(unlabeled):
            print(f"self-training ends: round {number + 1}'s pseudo-labels differ from this round's in {changed} "
                  f"images, under {MIN_CHANGED_FRACTION:.0%} of the unlabelled images")
            break
    return finish(out, summaries, measured=not cfg.teacher or cfg.check_labels != str(out / TEACHER_CHECK_NAME))


def validation_correct(out, number):
    """{validation image: read right} of round `number`'s model (every round has the same validation split)."""
    results = json.loads((round_dir(out, number) / "metrics.json").read_text())
    return {r["path"]: r["prediction"] == r["truth"] for r in results.get("val_readings", [])}


def choose_round(out, summaries):
    """The last round, trained on the most (and the most precise) pseudo-labels, unless an earlier round reads
    the validation images better beyond chance (metrics.better_beyond_chance, image by image): a validation
    split of 20 images cannot tell one error from noise. Among such earlier rounds, the lowest validation CER."""
    last = summaries[-1]
    last_correct = validation_correct(out, last["round"])
    better = []
    for summary in summaries[:-1]:  # each against the last on the validation images both read
        correct = validation_correct(out, summary["round"])
        shared = sorted(set(correct) & set(last_correct))
        if metrics.earlier_better([last_correct[p] for p in shared], [[correct[p] for p in shared]]):
            better.append(summary)
    if not better:
        return last, "the last round; no earlier round reads validation better beyond chance"
    return (min(better, key=lambda s: (s["val_cer"], -s["round"])),
            f"it reads validation better than round {last['round']} beyond chance")


def finish(out, summaries, measured=True):
    """The chosen round (choose_round) becomes the run's result: its models and metrics are copied to `out`.
    measured False (a teacher and no check folder): its scores are agreement with the teacher, and its models
    keep no confidence threshold (one chosen on the teacher's readings would promise a precision never measured)."""
    chosen, why = choose_round(out, summaries)
    source = round_dir(out, chosen["round"])
    for name in RESULT_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    results = {**json.loads((source / "metrics.json").read_text()),
               "self_training": {"chosen_round": chosen["round"], "why": why, "rounds": summaries}}
    if not measured:
        for name in (runstate.BEST_NAME, runstate.FINAL_NAME, runstate.LOWEST_VAL_NAME):
            if (out / name).exists():
                model.update_meta(out / name, {"abstain": None})
        results["scored_on"] = "the teacher's held-out readings: agreement with the teacher, not accuracy"
        print(f"the run's scores are agreement with the teacher on {TEACHER_CHECK_NAME}, not accuracy: give "
              f"--check a folder of images labelled by people to measure it; no confidence threshold stored")
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    print(f"self-training: round {chosen['round']} chosen ({why}); its models and metrics copied to {out}")
    twin.write_twin(out / runstate.BEST_NAME)  # the round's own, unless the metadata changed above
    return results
