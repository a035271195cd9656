"""runlength.py and callbacks.HoldWhileValidationPays: a run trains as long as its validation pays, then anneals;
a fixed length when asked; a time budget kept; a stop within the anneal resumes into it."""

import csv
import json
import os
import subprocess
import sys

import pytest

import callbacks
import model
import modelmeta
import recipes
import runlength
import runstate
import runscore
import train
from conftest import DIGITS, ROOT, stop_after_epoch
from charsets import Charset

VAL_CHARS = 1000  # validation characters: a CER of 0.02 is 20 errors, which spread by about 4.5 between checks


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def hold_ends(checks, anneal_epochs=lambda done: 2, max_epochs=100, seconds=0.0, seconds_per_epoch=0.0, history=()):
    """The epoch count (1-based) after which HoldWhileValidationPays(4) ends the held peak for these checks, given
    as (val_cer, val_exact_match, val_loss), and why; (None, None) if it holds through them."""
    crnn = model.build_model(model.PRESETS["tiny"], Charset(DIGITS).num_classes)
    anneal, clock = {}, FakeClock()
    hold = callbacks.HoldWhileValidationPays(4, VAL_CHARS, anneal, anneal_epochs, max_epochs, seconds=seconds,
                                             history=history, clock=clock)
    hold.set_model(crnn)
    hold.set_params({"steps": 50})
    crnn.stop_training = False
    hold.on_train_begin()
    for epoch, (cer, exact, loss) in enumerate(checks):
        clock.now += seconds_per_epoch
        hold.on_epoch_end(epoch, {"val_cer": cer, "val_exact_match": exact, "val_loss": loss})
        if crnn.stop_training:
            assert anneal["from_epoch"] == epoch + 1
            return epoch + 1, anneal["why"]
    return None, None


def test_the_peak_is_held_while_validation_reads_better_beyond_chance_and_no_longer():
    flat = (0.02, 0.9, 0.3)
    assert hold_ends([flat] * 10) == (5, "validation settled at step 250: 4 checks without fewer errors beyond chance "
                                         "or a 5% lower loss")
    # 20 errors, then 18, 17, 16: each within the noise of 20 (its square root, 4.5): not paying
    assert hold_ends([flat, (0.018, 0.9, 0.3), (0.017, 0.9, 0.3), (0.016, 0.9, 0.3), (0.016, 0.9, 0.3)])[0] == 5
    # still climbing: 6 fewer errors every other check, so every second check pays and the hold goes on
    climbing = [(0.1 - 0.006 * (i // 2), 0.9, 0.3) for i in range(16)]
    assert hold_ends(climbing) == (None, None)
    # nothing read yet (the CTC plateau): the CER stays at 1, but a loss 5% lower each check pays
    assert hold_ends([(1.0, 0.0, 20.0 * 0.9**i) for i in range(12)]) == (None, None)
    assert hold_ends([(1.0, 0.0, 20.0)] * 6)[0] == 5  # and a plateau whose loss is flat too has stalled
    # a small split (a check folder's 25 images): 2 errors in 100 characters wherever the model is, while its loss
    # still falls 6% a check; the hold goes on until the loss too stops reaching a new low by 5%
    small = [(0.02, 0.92, 0.3 * 0.94**i) for i in range(8)] + [(0.02, 0.92, 0.3 * 0.94**7)] * 4
    assert hold_ends(small) == (12, "validation settled at step 600: 4 checks without fewer errors beyond chance "
                                    "or a 5% lower loss")
    assert hold_ends([(0.02, 0.92, 0.3 * 0.99**i) for i in range(8)])[0] == 5  # 1% a check: 4 make no 5%
    assert hold_ends([flat], history=[flat] * 4)[0] == 1  # checks before a resume count


def test_the_hold_ends_in_time_for_the_anneal_within_the_ceiling_and_the_budget():
    climbing = [(0.2 - 0.01 * i, 0.9, 0.3) for i in range(20)]
    # ceiling of 10 epochs, anneal of 2: the hold ends after epoch 8
    assert hold_ends(climbing, max_epochs=10) == (8, "the step ceiling: 500 steps")
    # 60 s an epoch, a 10-minute budget, an anneal of 2 epochs: after 7 epochs (420 s) one more and the anneal
    # (180 s) still end by 600 s; after 8 they would not, so the anneal starts and the run ends at 600 s
    ended, why = hold_ends(climbing, seconds=600, seconds_per_epoch=60)
    assert ended == 8 and why.startswith("the time budget: 8.0 of 10 minutes spent")


def test_the_anneal_is_a_quarter_of_the_steps_made_at_least_the_minimum_and_a_pass():
    recipe = recipes.RECIPES["default"]
    assert runlength.anneal_epochs(recipe, 2, 50) == 2  # 100 steps made: the minimum anneal, 100 steps
    assert runlength.anneal_epochs(recipe, 20, 50) == 5  # 1,000 steps made: 250 steps
    assert runlength.anneal_epochs(recipe, 10, 50, pass_steps=500) == 10  # a pass over 16,000 images: 500 steps
    assert runlength.anneal_epochs(recipe, 20, 50, pass_steps=56) == 5  # a small folder's pass changes nothing
    schedule = recipes.anneal_from(recipe, 1000, 250)  # from the peak at step 1,000 to 1% of it at step 1,250
    rates = [float(schedule(step)) for step in (0, 999, 1000, 1125, 1250, 2000)]
    assert rates[:3] == pytest.approx([recipe.learning_rate] * 3)
    assert rates[3] == pytest.approx(recipe.learning_rate * 0.505, rel=1e-3)
    assert rates[4] == rates[5] == pytest.approx(recipe.learning_rate * 0.01)
    held = recipes.held_peak(recipe)
    assert float(held(0)) == pytest.approx(recipe.learning_rate / 10)
    assert [float(held(step)) for step in (50, 500, 5000)] == pytest.approx([recipe.learning_rate] * 3)


def test_a_run_follows_validation_unless_a_length_is_forced():
    recipe = recipes.RECIPES["default"]
    follows = runlength.plan(runlength.LengthFlags(data_dir="site"), recipe, 1782)
    assert follows.follows_validation and follows.epoch_steps == 50
    assert follows.epochs == 61  # the ceiling: 30 passes of 56 steps or 3,000 steps, whichever is more, in checks
    for forced in (dict(epochs=4), dict(min_steps=300), dict(freeze_cnn_epochs=2)):
        assert not runlength.plan(runlength.LengthFlags(data_dir="site", **forced), recipe, 1782).follows_validation
    assert not runlength.plan(runlength.LengthFlags(data_dir="site"), recipes.RECIPES["reference"], 1782).follows_validation
    with pytest.raises(Exception, match="--minutes 5 fits the length of a run that follows its validation"):
        runlength.plan(runlength.LengthFlags(data_dir="site", epochs=3, minutes=5), recipe, 1782)


def log_epochs(out):
    with open(out / runstate.LOG_NAME) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def scripted_validation(monkeypatch, cers):
    """runscore.evaluate during training reads validation at these CERs in turn (the last one after them), read
    right where the CER is under 0.5, at a loss that never moves; every other call (scoring the run's model) is the
    real one."""
    evaluate, calls = runscore.evaluate, []

    def scripted(keras_model, batches, charset, labels, lengths=None):
        scores, decoded = evaluate(keras_model, batches, charset, labels, lengths)
        if lengths is not None:  # the run's model being scored, not an epoch's validation
            return scores, decoded
        cer = cers[min(len(calls), len(cers) - 1)]
        calls.append(cer)
        return {**scores, "cer": cer, "exact_match": 0.9 if cer < 0.5 else 0.0, "loss": 1.0}, decoded

    monkeypatch.setattr(runscore, "evaluate", scripted)
    return calls


def tiny_run(folder, out, *extra):
    return train.main(["--data_dir", str(folder), "--preset", "tiny", "--charset", "digits", "--batch_size", "8",
                       "--workers", "1", "--check_every", "10", "--out", str(out), *extra])


def test_a_run_stops_early_on_a_folder_it_learns_at_once_and_goes_on_while_it_climbs(
        digits_folder, tmp_path, monkeypatch, capsys):
    scripted_validation(monkeypatch, [0.1])  # learnt at once: the same reading every check
    assert tiny_run(digits_folder, tmp_path / "flat") == 0
    printed = capsys.readouterr().out
    assert "length: as long as validation pays. Validated every 10 steps on 4 images" in printed
    # held for the first check and 4 that did not pay, then an anneal of the minimum 100 steps (10 checks)
    assert "validation settled at step 50: 4 checks without fewer errors beyond chance or a 5% lower loss; " \
           "annealing over 100 steps (epochs 6-15)" in printed
    assert log_epochs(tmp_path / "flat") == list(range(15))
    assert json.loads((tmp_path / "flat" / "metrics.json").read_text())["steps_run"] == 150
    assert annealed(tmp_path / "flat")

    climbing = [1.0 - 0.1 * i for i in range(10)] + [0.05]  # 10 checks of a tenth fewer errors each: it pays
    scripted_validation(monkeypatch, climbing)
    assert tiny_run(digits_folder, tmp_path / "climbing") == 0
    settled = [line for line in capsys.readouterr().out.splitlines() if "annealing over" in line][0]
    assert settled.startswith("validation settled at step ")
    assert int(settled.split("step ")[1].split(":")[0]) >= 10 * 10  # not before the climb ended


def test_a_stop_within_the_anneal_resumes_into_it(digits_folder, tmp_path, monkeypatch, capsys):
    scripted_validation(monkeypatch, [0.1])
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 8)  # the hold ended after epoch 5: epoch 8 is the anneal's third
        assert tiny_run(digits_folder, out) == 130
    assert modelmeta.read_meta(out / runstate.RESUME_NAME)["resume"]["anneal"]["from_epoch"] == 5
    capsys.readouterr()
    assert train.main(["--resume", "--out", str(out)]) == 0
    assert "annealing over 100 steps (epochs 6-15)" in capsys.readouterr().out
    assert log_epochs(out) == list(range(15))  # the anneal's remaining epochs, not a new hold
    assert json.loads((out / "metrics.json").read_text())["steps_run"] == 150


SCRIPTED_RUN = """
import sys
import runscore, train
evaluate = runscore.evaluate
def settled(keras_model, batches, charset, labels, lengths=None):  # the same validation reading every check
    scores, decoded = evaluate(keras_model, batches, charset, labels, lengths)
    return (scores if lengths is not None else {**scores, "cer": 0.1, "exact_match": 0.9, "loss": 1.0}), decoded
runscore.evaluate = settled
sys.exit(train.main(sys.argv[1:]))
"""


def annealed(out):
    """Whether the run in `out` ended its 150 steps at the anneal's floor, 1% of the peak learning rate."""
    final, _ = model.load_model(out / runstate.FINAL_NAME, compile=True)
    peak = recipes.RECIPES["default"].learning_rate
    return (int(final.optimizer.iterations.numpy()) == 150
            and float(final.optimizer.learning_rate.numpy()) == pytest.approx(0.01 * peak, rel=1e-3))


def test_the_anneal_takes_the_learning_rate_down_under_jax_too(digits_folder, tmp_path):
    """The anneal swaps the optimizer's schedule between two fit() calls; JAX compiles the step anew too."""
    pytest.importorskip("jax")
    backend = "jax"
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPTED_RUN, "--data_dir", str(digits_folder), "--preset", "tiny", "--charset",
         "digits", "--batch_size", "8", "--workers", "1", "--check_every", "10", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "KERAS_BACKEND": backend})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"({backend} backend)" in result.stdout and "annealing over 100 steps (epochs 6-15)" in result.stdout
    assert annealed(out)
