"""How to train: the recipes (optimizer, learning-rate schedule, batch size, augmentation, what picks the
checkpoint), the optimizer they build, and how many updates a run makes. The network itself is model.py."""

import math
from dataclasses import dataclass, replace

import quiet  # noqa: F401  (first: TensorFlow's start-up lines off; quiet.py)
import keras

import augment
from model import CTCLoss
from errors import CaptchaError
from preprocess import CLAHE_CLIP, Canvas, PreprocessOptions

DEFAULT_EPOCHS = 30  # passes over the training images when --epochs is unset; small folders get more (--min_steps)
MIN_EPOCH_STEPS = 50  # with --epochs unset, a small folder's epoch passes over its images more than once
CPU_BUILTIN_STEPS = 3000  # on a CPU, `python train.py` on the built-in data makes at most about this many steps
FIXED_MIN_STEPS = 3000  # a fixed-length run with --epochs unset makes at least this many steps (--min_steps); it is
#                         also the ceiling of a run whose length follows validation


@dataclass(frozen=True)
class Recipe:
    """How to train: optimizer, learning-rate schedule, batch size, and what the callbacks watch."""

    optimizer: str = "adamw"  # "adam" or "adamw"
    learning_rate: float = 3e-3  # the peak, for "onecycle"
    weight_decay: float = 1e-4  # adamw only
    clipnorm: float = 1.0  # 0: no clipping
    schedule: str = "onecycle"  # "onecycle": linear warm-up, then cosine decay to ~0 over the run (a run whose
    #                             length follows validation holds the peak until validation stalls, then decays:
    #                             runlength.py); "plateau": constant, halved when val_loss stalls; "constant"
    warmup_fraction: float = 0.05
    check_every: int = 50  # a run whose length follows validation: validated every this many steps (its epoch);
    #                        the warm-up lasts one such check
    check_images: int = 512  # ... each check reads at most this many validation images (the run's model is still
    #                          chosen on all of them): a check of 2,000 cost more than its 50 steps on a CPU
    stall_checks: int = 4  # ... the peak is held until this many checks in a row read validation no better beyond
    #                        chance (callbacks.HoldWhileValidationPays)
    anneal_fraction: float = 0.25  # ... then the rate decays to ~0 over this fraction of the steps made so far,
    min_anneal_steps: int = 100  # and at least this many, on the images as they are
    batch_size: int = 32
    monitor: str = "val_cer"  # what picks the best checkpoint and stops early: val_cer or val_loss
    stop_patience: int = 0  # epochs without improvement before stopping; 0: train.py's --patience
    restore_best: bool = False  # EarlyStopping puts the best epoch's weights back
    plateau_patience: int = 2  # "plateau": epochs of stalled val_loss before the rate is halved (min 1e-5)
    augment: str = "light"  # on-the-fly augmentation of training images (augment.LEVELS), or "none"
    clean_finish: float = 0.25  # the last fraction of the planned epochs trains on the images as they are (at the
    #                             low end of the rate, the network fits the site's own pixels, not altered ones)
    settle_epochs: int = 10  # stop once the validation CER has not changed for this many epochs; 0: never
    precise_bn_batches: int = 8  # BatchNorm statistics measured afresh on this many training batches each epoch; 0: off
    ema_momentum: float = 0.0  # > 0 (e.g. 0.995): validation, checkpoints and the final model use an exponential
    #                            moving average of the weights (Keras' use_ema); 0: the weights as trained
    resize: str = "default"  # the preprocessing's resize-and-pad arithmetic (PreprocessOptions.resize)
    clahe_clip: float = CLAHE_CLIP  # the preprocessing's contrast equalisation (PreprocessOptions.clahe_clip); 0: none

    def preprocess_options(self, canvas=Canvas(), **switches):
        """The pixels this recipe trains a network on: `canvas` (preprocess.Canvas), its resize arithmetic and
        CLAHE, and train.py's switches (auto_crop, force_invert, strong)."""
        return PreprocessOptions(canvas, resize=self.resize, clahe_clip=self.clahe_clip, **switches)


RECIPES = {
    # The reference project's: Adam at 1e-3, batch 128, ReduceLROnPlateau(val_loss, patience 2, factor 0.5,
    # min 1e-5), EarlyStopping(val_loss, patience 5, best weights restored), best checkpoint on val_loss.
    "reference": Recipe(optimizer="adam", learning_rate=1e-3, weight_decay=0.0, clipnorm=0.0, schedule="plateau",
                        warmup_fraction=0.0, batch_size=128, monitor="val_loss", stop_patience=5, restore_best=True,
                        plateau_patience=2, augment="none", resize="reference", precise_bn_batches=0,
                        settle_epochs=0, ema_momentum=0.0),
    # The keras-io captcha example's: Adam at 1e-3, batch 16, EarlyStopping(val_loss, patience 10, best weights);
    # its pixels: the image stretched to 200x50, no contrast equalisation.
    "kerasio": Recipe(optimizer="adam", learning_rate=1e-3, weight_decay=0.0, clipnorm=0.0, schedule="constant",
                      warmup_fraction=0.0, batch_size=16, monitor="val_loss", stop_patience=10, restore_best=True,
                      augment="none", precise_bn_batches=0, resize="stretch", clahe_clip=0.0, settle_epochs=0,
                      ema_momentum=0.0),
    "default": Recipe(),
}


def one_cycle(recipe, total_steps):
    """Linear warm-up from a tenth of the peak over `warmup_fraction` of the steps, then cosine decay to 1% of it
    by `total_steps`."""
    warmup = max(1, int(total_steps * recipe.warmup_fraction))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=recipe.learning_rate / 10, warmup_target=recipe.learning_rate, warmup_steps=warmup,
        decay_steps=max(1, total_steps - warmup), alpha=0.01)


def held_peak(recipe):
    """The stable phase of a run whose length follows validation: the one-cycle warm-up over one check's steps,
    then the peak, held (a cosine with alpha 1 does not decay)."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=recipe.learning_rate / 10, warmup_target=recipe.learning_rate,
        warmup_steps=recipe.check_every, decay_steps=1, alpha=1.0)


def anneal_from(recipe, first_step, steps):
    """Its anneal: the peak until `first_step`, then cosine decay to 1% of it over `steps` (the one-cycle's end)."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=recipe.learning_rate, warmup_target=recipe.learning_rate, warmup_steps=first_step,
        decay_steps=max(1, steps), alpha=0.01)


def make_optimizer(recipe, total_steps=None):
    """The recipe's optimizer; `total_steps` (batches in the whole run) shapes the one-cycle schedule, and None
    holds its peak (held_peak) for a run whose length follows validation."""
    learning_rate = recipe.learning_rate
    if recipe.schedule == "onecycle":
        learning_rate = held_peak(recipe) if total_steps is None else one_cycle(recipe, total_steps)
    elif recipe.schedule not in ("plateau", "constant"):
        raise CaptchaError(f"unknown schedule {recipe.schedule!r}: use 'onecycle', 'plateau' or 'constant'")
    options = {"clipnorm": recipe.clipnorm} if recipe.clipnorm else {}
    if recipe.ema_momentum:  # the average lives in the optimizer; callbacks.AveragedWeights swaps it in to evaluate
        options.update(use_ema=True, ema_momentum=recipe.ema_momentum)
    if recipe.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=recipe.weight_decay, **options)
    if recipe.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate, **options)
    raise CaptchaError(f"unknown optimizer {recipe.optimizer!r}: use 'adam' or 'adamw'")


def compile_model(model, charset, recipe=RECIPES["reference"], total_steps=1):
    """total_steps None: the peak held until runlength.py starts the anneal."""
    model.compile(optimizer=make_optimizer(recipe, total_steps), loss=CTCLoss(charset.blank_index))
    return model


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


def with_flags(name, *, patience=None, **flags):
    """The recipe `name` with a run's flags in it: a flag left unset (None) keeps the recipe's value."""
    if name not in RECIPES:
        raise CaptchaError(f"unknown --recipe {name!r}; choose from {sorted(RECIPES)}")
    flags["stop_patience"] = patience
    recipe = replace(RECIPES[name], **{key: value for key, value in flags.items() if value is not None})
    if recipe.augment not in augment.CHOICES:
        raise CaptchaError(f"unknown --augment {recipe.augment!r}; choose from {', '.join(augment.CHOICES)}")
    if not 0 <= recipe.clean_finish <= 1:
        raise CaptchaError(f"--clean_finish {recipe.clean_finish:g}: a fraction of the epochs, from 0 to 1")
    if recipe.check_every < 1:
        raise CaptchaError(f"--check_every {recipe.check_every}: a number of steps, at least 1")
    if not 0 <= recipe.ema_momentum < 1:
        raise CaptchaError(f"--ema_momentum {recipe.ema_momentum:g}: from 0 (off) to below 1, e.g. 0.995")
    if patience is not None and recipe.schedule == "onecycle":
        print(f"--patience {patience}: not used, a one-cycle run ({name} recipe) runs its whole schedule "
              f"unless its validation settles (--settle_epochs)")
    return recipe
