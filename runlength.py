"""How long a run trains: a fixed length, or as long as its validation pays.

Fixed (--epochs or --min_steps given, --freeze_cnn_epochs, or a recipe that is not one-cycle): the epochs
planned, one cycle of the learning rate over them, the last `clean_finish` of them on unaltered images.

Following validation (the default recipe without those flags): warmup-stable-decay. An epoch is one check,
`check_every` steps that the loader draws from an endless run of shuffled passes, so a folder of any size is
validated as often. The rate warms up over the first check and is then held at its peak while validation reads
better beyond chance or at a lower loss (callbacks.HoldWhileValidationPays); once `stall_checks` checks in a row
have not, it decays to ~0 over `anneal_fraction` of the steps made so far (at least `min_anneal_steps`, and at
least one pass over the training images) on the images as they are, and the run ends. The ceiling is the fixed length the run would make
otherwise; `--minutes` fits the held phase and the anneal into a time budget. Why this and not a fixed cycle: docs/design.md, "A run's length".
"""

import math
import sys
from dataclasses import dataclass

import callbacks
import model
import recipes
import runstate
from errors import CaptchaError


@dataclass(frozen=True)
class Length:
    epochs: int  # fixed: the epochs; following validation: the ceiling, the anneal included
    repeats: int = 1  # fixed: passes over the training images in an epoch
    augment_epochs: int | None = None  # fixed: the epochs before the clean finish
    epoch_steps: int | None = None  # following validation: the steps of an epoch (one check)
    pass_steps: int = 0  # following validation: the steps of one pass over the training images (at most half the
    #                      ceiling: a huge folder's pass would leave no room for the hold)
    ceiling_why: str = ""  # following validation: where the ceiling comes from

    @property
    def follows_validation(self):
        return self.epoch_steps is not None


@dataclass(frozen=True)
class LengthFlags:
    """The flags that decide a run's length (train.py's of the same names: cli.section)."""

    epochs: int | None = None  # a fixed length in passes
    min_steps: int = 0  # a fixed length of at least this many steps
    minutes: float = 0  # a time budget for a run that follows its validation
    freeze_cnn_epochs: int = 0  # fine-tuning in two phases: a fixed length
    data_dir: str = ""  # with `check`: a run with neither is the built-in one
    check: str = ""


def cpu_sized(flags):
    """The built-in run on a machine without a GPU is sized for a laptop, unless --epochs says otherwise. A run on
    a teacher's pseudo-labels and a check folder has no --data_dir either, but is no built-in run."""
    return not flags.data_dir and not flags.check and not flags.epochs and not model.gpu_names()


def follows_validation(flags, recipe):
    return recipe.schedule == "onecycle" and not flags.epochs and not flags.min_steps and not flags.freeze_cnn_epochs


def plan(flags, recipe, train_images):
    """The run's Length, from its LengthFlags, its recipe and the training images (pseudo-labelled ones
    included)."""
    if flags.minutes < 0:
        raise CaptchaError(f"--minutes {flags.minutes:g}: a time budget in minutes, above 0 (0: none)")
    if flags.minutes and not follows_validation(flags, recipe):
        raise CaptchaError(f"--minutes {flags.minutes:g} fits the length of a run that follows its validation (the "
                           f"default recipe, no --epochs, --min_steps or --freeze_cnn_epochs)")
    epochs, repeats = recipes.plan_epochs(flags.epochs, flags.min_steps or recipes.FIXED_MIN_STEPS, train_images,
                                          recipe.batch_size)
    steps = epochs * math.ceil(train_images * repeats / recipe.batch_size)
    if cpu_sized(flags):
        epochs = recipes.cpu_builtin_epochs(train_images * repeats, recipe.batch_size)
        steps = epochs * math.ceil(train_images * repeats / recipe.batch_size)
        print(f"no GPU: the built-in run is sized for a CPU, at most about {recipes.CPU_BUILTIN_STEPS} steps; "
              f"--epochs {recipes.DEFAULT_EPOCHS} makes the full run a GPU makes")
    if follows_validation(flags, recipe):
        why = ("the CPU-sized built-in run" if cpu_sized(flags) else
               f"{recipes.DEFAULT_EPOCHS} passes or {recipes.FIXED_MIN_STEPS} steps, whichever is more")
        return Length(math.ceil(steps / recipe.check_every), epoch_steps=recipe.check_every,
                      pass_steps=min(math.ceil(train_images / recipe.batch_size), steps // 2), ceiling_why=why)
    return Length(epochs, repeats, epochs - round(epochs * recipe.clean_finish))


def anneal_epochs(recipe, epochs_done, epoch_steps, pass_steps=0):
    """The epochs of the anneal that starts after `epochs_done` epochs of `epoch_steps` steps: a quarter of the
    steps made, at least the recipe's minimum, and at least one pass over the training images (`pass_steps`), so
    that each is seen as the rate comes down."""
    steps = max(recipe.min_anneal_steps, recipe.anneal_fraction * epochs_done * epoch_steps, pass_steps)
    return math.ceil(steps / epoch_steps)


def describe(flags, recipe, length, steps_per_epoch, check_images):
    """The plan line: how long the run trains, and what it waits for."""
    if length.follows_validation:
        return (f"length: as long as validation pays. Validated every {length.epoch_steps} steps on {check_images} "
                f"images; the learning rate "
                f"warms up over the first {length.epoch_steps}, is held at its peak until {recipe.stall_checks} checks "
                f"in a row read validation no better (fewer errors beyond chance, or a "
                f"{1 - callbacks.HoldWhileValidationPays.LOSS_FACTOR:.0%} lower loss), then anneals over "
                f"{recipe.anneal_fraction:.0%} of the steps made (at least {max(recipe.min_anneal_steps, length.pass_steps)}: {recipe.min_anneal_steps}, or a "
                f"pass over the training images) on the images as they are; augmentation "
                f"{recipe.augment} until then"
                + (f"; within {flags.minutes:g} minutes" if flags.minutes else "")
                + f"; at most {length.epochs * length.epoch_steps} steps ({length.ceiling_why})")
    epochs, augment_epochs = length.epochs, length.augment_epochs
    return (f"{epochs} epochs of {steps_per_epoch} steps = {epochs * steps_per_epoch} optimizer steps"
            + (f" ({length.repeats} passes over the training images an epoch)" if length.repeats > 1 else "")
            + f"; augmentation: {recipe.augment}"
            + ("" if recipe.augment == "none" or augment_epochs >= epochs
               else f" for epochs 1-{augment_epochs}, then the images as they are" if augment_epochs
               else " (no epoch: --clean_finish 1)")
            + (f"; ends once the validation CER holds {recipe.settle_epochs} epochs of the clean finish"
               if recipe.settle_epochs and epochs - augment_epochs >= recipe.settle_epochs else ""))


def hold_callback(flags, recipe, length, val_labels, anneal, out, resumed):
    """A run that follows validation: its HoldWhileValidationPays, with the checks before a resume read back
    from the log. `anneal` is the run's state of it (from the resume checkpoint), which the callback fills."""
    if not length.follows_validation:
        return None
    history = runstate.validation_history(out / runstate.LOG_NAME, with_loss=True) if resumed else ()
    return callbacks.HoldWhileValidationPays(
        recipe.stall_checks, sum(len(label) for label in val_labels), anneal,
        lambda done: anneal_epochs(recipe, done, length.epoch_steps, length.pass_steps), length.epochs,
        seconds=60 * flags.minutes,
        history=history)


def start_anneal(crnn, train_batches, recipe, anneal, length):
    """From the epoch `anneal["from_epoch"]` on: the learning rate decays from its peak, and the images train as
    they are. Called when the hold ends, and again on a resume within the anneal (the saved optimizer may hold
    the peak's schedule: the stop came between the two)."""
    first, epoch_steps = anneal["from_epoch"], length.epoch_steps
    anneal.setdefault("epochs", anneal_epochs(recipe, first, epoch_steps, length.pass_steps))
    crnn.optimizer.learning_rate = recipes.anneal_from(recipe, first * epoch_steps, anneal["epochs"] * epoch_steps)
    crnn.make_train_function(force=True)  # the schedule is read inside the compiled step
    train_batches.augment_epochs = first


def fit(crnn, train_batches, run_callbacks, *, first_epoch, length, recipe, anneal):
    """Training as long as validation pays: fit() while the peak is held, then the anneal's epochs. Returns the
    epochs trained."""
    arguments = dict(verbose=1 if sys.stdout.isatty() else 2, shuffle=False)  # the loader shuffles (finetune.py)
    trained = 0
    if anneal.get("from_epoch") is None:
        history = crnn.fit(train_batches, epochs=length.epochs, initial_epoch=first_epoch,
                           callbacks=run_callbacks.all, **arguments)
        trained = len(history.history.get("loss", []))
        first_epoch += trained
        if anneal.get("from_epoch") is None:  # fit() ran to the ceiling before the hold's own check said so
            anneal.update(from_epoch=first_epoch, why=f"the step ceiling: {first_epoch * length.epoch_steps} steps")
        start_anneal(crnn, train_batches, recipe, anneal, length)
        run_callbacks.log.append = True  # the anneal's rows follow
    end = anneal["from_epoch"] + anneal["epochs"]
    print(f"{anneal['why']}; annealing over {(end - anneal['from_epoch']) * length.epoch_steps} steps "
          f"(epochs {anneal['from_epoch'] + 1}-{end}) on the images as they are")
    if first_epoch >= end:
        return trained
    history = crnn.fit(train_batches, epochs=end, initial_epoch=first_epoch, callbacks=[
        c for c in run_callbacks.all if not isinstance(c, callbacks.HoldWhileValidationPays)], **arguments)
    return trained + len(history.history.get("loss", []))
