"""The callbacks of a training run, and the one function that puts them in order (train.py and bench.py).

What a run means at each epoch's end lives in that order: the weights' average swapped in, BatchNorm
statistics measured afresh, validation read, the best checkpoint saved, the stops decided, the log
row written, the trained weights put back, the resume checkpoint saved, and last a stop asked for
during all that. `run_callbacks` builds the list; each class says what it does.
"""

import contextlib
import dataclasses
import signal
import threading
import time

import quiet  # noqa: F401  (first: TensorFlow's start-up lines off; quiet.py)
import keras
import numpy as np

import model
import runstate
import runscore


def early_stopping(recipe):
    """Stops on the recipe's monitor after `stop_patience` epochs without a better score; None for a one-cycle
    run, which runs its whole schedule unless its validation settles (StopWhenSettled): its low-rate end is
    where it sharpens, and validation that has stalled at the rate's peak says nothing about it
    (docs/design.md, "The settle rule")."""
    if recipe.schedule == "onecycle" or not recipe.stop_patience:
        return None
    return keras.callbacks.EarlyStopping(monitor=recipe.monitor, mode="min", patience=recipe.stop_patience,
                                         restore_best_weights=recipe.restore_best, verbose=1)


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
    can read almost nothing right at inference (docs/design.md, "Precise BatchNorm"). Layer by layer, in
    inference mode (each layer's
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
        scores, _ = runscore.evaluate(self.model, self.val_batches, self.charset, self.val_labels)
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
    it reads most images (exact match above 0.5), all of them from epoch `from_epoch` (0-based: the clean
    finish's first) on. The run's model is its final epoch's, and a one-cycle run sharpens at its low-rate
    end, so a run stops only there; a small validation split holds still long before (docs/design.md, "The
    settle rule"). A CER stuck at the CTC plateau, where nothing reads yet, is not settled: that run may
    still leave it. `history`: (val_cer, val_exact_match) of the epochs before a resume."""

    def __init__(self, epochs, history=(), from_epoch=0):
        super().__init__()
        self.epochs, self.history, self.from_epoch = epochs, list(history), from_epoch

    def settled(self):
        last = self.history[-self.epochs:]
        return (len(last) == self.epochs and len(self.history) - self.epochs >= self.from_epoch
                and all(exact > 0.5 for _, exact in last)  # (a CER read back from the log
                and all(round(cer, 9) == round(last[0][0], 9) for cer, _ in last))  # may differ in its last bits)

    def on_epoch_end(self, epoch, logs=None):
        self.history.append((logs["val_cer"], logs["val_exact_match"]))
        if self.settled():
            print(f"validation settled: CER {logs['val_cer']:.4f} for {self.epochs} epochs; stopping after epoch "
                  f"{epoch + 1}")
            self.model.stop_training = True


class HoldWhileValidationPays(keras.callbacks.Callback):
    """The stable phase of a run whose length follows its validation (runlength.py): stops fit() once `checks`
    validations in a row have not read better beyond chance than the last one that did, or when what is left of
    the step ceiling or the time budget only covers the anneal. Better beyond chance: fewer character errors than
    that check, by more than the square root of its count (about how far the errors of two equal models spread
    on the same images), or a validation loss 5% lower than that check's: on the CTC plateau the CER hardly moves,
    and on a small validation split (a check folder of 25 images) the errors are too few to show a gain that the
    loss, summed over every character's probability, still shows. Writes its decision into `anneal`
    ({"from_epoch", "why"}), which the resume checkpoint after it saves.

    anneal_epochs(epochs_done): how many epochs the anneal takes after that many; max_epochs: the ceiling on
    stable and anneal epochs together; seconds: the time budget (0: none), counted from this session's start;
    history: (val_cer, val_exact_match, val_loss) of the epochs before a resume."""

    LOSS_FACTOR = 0.95  # a loss this much lower than the last paying check's is progress

    def __init__(self, checks, val_chars, anneal, anneal_epochs, max_epochs, seconds=0.0, history=(),
                 clock=time.perf_counter):
        super().__init__()
        self.clock = clock
        self.checks, self.val_chars, self.anneal = checks, max(1, val_chars), anneal
        self.anneal_epochs, self.max_epochs = anneal_epochs, max_epochs
        self.seconds = seconds
        self.reference, self.since = None, 0  # the last check that paid: (errors, loss); checks since it
        self.began = self.epochs_timed = None
        for cer, _, loss in history:
            self.paid(cer, loss)

    def paid(self, cer, loss):
        """Counts a check: it becomes the reference if it reads better beyond chance than the reference, else it
        is one more check since."""
        errors = round(cer * self.val_chars)
        if self.reference is None or errors < self.reference[0] - max(1.0, self.reference[0] ** 0.5) or (
                loss < self.LOSS_FACTOR * self.reference[1]):
            self.reference, self.since = (errors, loss), 0
        else:
            self.since += 1

    def on_train_begin(self, logs=None):
        self.began, self.epochs_timed = self.clock(), 0

    def on_epoch_end(self, epoch, logs=None):
        self.paid(logs["val_cer"], logs["val_loss"])
        self.epochs_timed += 1
        done = epoch + 1
        spent = self.clock() - self.began
        per_epoch = spent / self.epochs_timed  # validation and checkpoints included
        steps = self.params.get("steps") or 0
        if self.since >= self.checks:
            why = (f"validation settled at step {done * steps}: {self.checks} checks without fewer errors beyond "
                   f"chance or a {1 - self.LOSS_FACTOR:.0%} lower loss")
        elif done + self.anneal_epochs(done) >= self.max_epochs:
            why = f"the step ceiling: {self.max_epochs * steps} steps"
        elif self.seconds and spent + per_epoch * (1 + self.anneal_epochs(done + 1)) > self.seconds:
            why = f"the time budget: {spent / 60:.1f} of {self.seconds / 60:g} minutes spent, the anneal takes the rest"
        else:
            return
        self.anneal.update(from_epoch=done, why=why)
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

    LAST_STEP = 25

    def __init__(self, steps_left, first=5, last=LAST_STEP, bound=False):
        """bound: `steps_left` is a ceiling (a run whose length follows validation usually ends well before)."""
        super().__init__()
        self.steps_left, self.first, self.last, self.bound = steps_left, first, last, bound
        self.started, self.done = None, False

    def on_train_batch_end(self, batch, logs=None):
        if self.done:
            return
        if batch + 1 == self.first:
            self.started = time.perf_counter()
        elif batch + 1 == self.last and self.started is not None:
            seconds = (time.perf_counter() - self.started) / (self.last - self.first)
            planned = (f"at most {seconds * self.steps_left / 60:.0f} min for at most {self.steps_left} steps (it ends "
                       f"once validation stops paying)" if self.bound
                       else f"about {seconds * self.steps_left / 60:.0f} min for the {self.steps_left} steps planned")
            print(f"\nexpected: {planned} on this device ({1000 * seconds:.0f} ms a step over steps "
                  f"{self.first + 1}-{self.last}; "
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


@contextlib.contextmanager
def stop_on_signals():
    """A script's main(): Ctrl-C and SIGTERM (preemptible machines send it first) go to STOP, so a run in fit()
    stops between steps and saves what --resume continues from."""
    STOP.reset()  # (main() may run more than once in a process: the tests call it)

    def on_signal(signum, frame):
        STOP.request(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can Python take signals
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(s, on_signal) for s in stop_signals] if in_main_thread else []
    try:
        yield STOP
    finally:
        for s, handler in zip(stop_signals, previous):
            signal.signal(s, handler)


def stopped_status():
    """The exit status of a script that a signal stopped: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (STOP.signal or signal.SIGINT)


class ResumeCheckpoint(keras.callbacks.Callback):
    """After every epoch, saves what `--resume` needs: the model with its optimizer state (learning
    rate included), the epochs done, the best val_cer so far and the run's settings (a dict of its flags)."""

    def __init__(self, path, meta, settings, best_checkpoint, epochs_done=0, anneal=None):
        super().__init__()
        self.path, self.meta, self.settings, self.best_checkpoint = path, meta, settings, best_checkpoint
        self.epochs_done = epochs_done
        self.anneal = anneal if anneal is not None else {}  # a run whose length follows validation: when it anneals

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_done = epoch + 1
        self.save()

    def save(self, finished=False):
        """finished=True: training is over (all epochs, or stopped early); only scoring is left."""
        state = {"epochs_done": self.epochs_done, "best_score": self.best_checkpoint.best,
                 "config": self.settings, "finished": finished, "anneal": self.anneal}
        model.save_model(self.model, self.path, {**self.meta, "resume": state})


@dataclasses.dataclass
class RunCallbacks:
    all: list  # in the order fit() runs them
    log: keras.callbacks.CSVLogger
    resume: ResumeCheckpoint


def reading_state(recipe, train_batches):
    """The callbacks that put the model into the state it is read and saved in at an epoch's end, and those
    that undo it afterwards: (before, after). Before: the weights' moving average swapped in (if the recipe
    keeps one), then BatchNorm statistics measured afresh for those weights. After: the trained weights
    back, so training goes on from them. train.py (run_callbacks) and bench.py run them in this order."""
    averaged = AveragedWeights() if recipe.ema_momentum else None
    before = [averaged,
              PreciseBatchNorm(train_batches, recipe.precise_bn_batches) if recipe.precise_bn_batches else None]
    after = [averaged.restore if averaged else None]
    return [c for c in before if c is not None], [c for c in after if c is not None]


@dataclasses.dataclass(frozen=True)
class Validation:
    """What each epoch's end reads: the validation batches, the charset, and the labels in the batches' order."""

    batches: object
    charset: object
    labels: list


@dataclasses.dataclass(frozen=True)
class RunStart:
    """Where training starts: after `epochs_done` epochs (a resume) with the best score so far, `steps_left` to make
    (a ceiling when the length follows validation), and the first epoch a settled validation may end the run at
    (`settle_from`, StopWhenSettled)."""

    epochs_done: int = 0
    best_score: float = np.inf
    steps_left: int = 0
    resumed: bool = False
    settle_from: int = 0


def run_callbacks(out, meta, settings, recipe, train_batches, validation, start=RunStart(), hold=None):
    """A run's callbacks, in their order: what each epoch's end means is this list. settings: the run's flags as a
    dict, saved for --resume; validation: a Validation; start: a RunStart. hold: a run whose length follows
    validation, its HoldWhileValidationPays (runlength.py)."""
    epochs_done, resumed = start.epochs_done, start.resumed
    log = keras.callbacks.CSVLogger(str(out / runstate.LOG_NAME), append=resumed)
    best = BestCheckpoint(out / runstate.BEST_NAME, meta, recipe.monitor, start.best_score)
    resume = ResumeCheckpoint(out / runstate.RESUME_NAME, meta, settings, best, epochs_done,
                              hold.anneal if hold else None)
    before, after = reading_state(recipe, train_batches)
    clock = EpochClock()
    ordered = [
        clock,  # first: it times the steps, and the epoch's end from here to clock.stop
        *before,  # the model as it is read: validation and checkpoints see it
        ValidationMetrics(validation.batches, validation.charset, validation.labels),  # the rest read its numbers
        best,
        early_stopping(recipe),
        StopWhenSettled(recipe.settle_epochs, runstate.validation_history(out / runstate.LOG_NAME) if resumed else (),
                        start.settle_from) if recipe.settle_epochs and not hold else None,
        hold,  # a run whose length follows validation: whether its peak is held one more check
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=recipe.plateau_patience,
                                          min_lr=1e-5, verbose=1)
        if recipe.schedule == "plateau" else None,  # a one-cycle schedule sets the rate itself
        clock.stop,
        log,
        DurationEstimate(start.steps_left, bound=hold is not None)
        if len(train_batches) > DurationEstimate.LAST_STEP else None,
        *after,  # training goes on from the trained weights, and resumes from them
        resume,  # it records what the others decided
        STOP,  # last: a stop asked for during the epoch's end waits until its checkpoints are written
    ]
    return RunCallbacks([callback for callback in ordered if callback is not None], log, resume)
