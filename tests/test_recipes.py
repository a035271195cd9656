"""recipes.py: how a run is planned (optimizer steps, epochs, the clean finish) from the recipe and the flags."""

import pytest

import callbacks
import dataset
import recipes
import runlength
import train
from conftest import DIGITS
from charsets import Charset
from errors import CaptchaError


def test_a_run_plans_its_clean_finish_from_the_recipe_or_the_flag(digits_folder, tmp_path, monkeypatch, capsys):
    loaders = []

    def keep_loaders(*args, **kwargs):
        loaders.append(split_batches(*args, **kwargs))
        return loaders[-1]

    split_batches = dataset.split_batches
    monkeypatch.setattr(dataset, "split_batches", keep_loaders)
    common = ["--data_dir", str(digits_folder), "--preset", "tiny", "--charset", "digits", "--batch_size", "16",
              "--workers", "1", "--epochs", "4"]
    assert train.main(common + ["--clean_finish", "0.5", "--out", str(tmp_path / "half")]) == 0
    assert "augmentation: light for epochs 1-2, then the images as they are" in capsys.readouterr().out
    assert loaders[-1][0].augment_epochs == 2 and loaders[-1][1].augment == loaders[-1][2].augment == "none"
    assert train.main(common + ["--out", str(tmp_path / "recipe")]) == 0  # the default recipe's quarter: 1 of 4
    assert loaders[-1][0].augment_epochs == 3 and recipes.RECIPES["default"].clean_finish == 0.25
    assert train.main(common + ["--clean_finish", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--clean_finish 1.5: a fraction of the epochs, from 0 to 1" in capsys.readouterr().err


def test_unknown_augmentation_is_refused(samples, digits_folder, capsys):
    with pytest.raises(CaptchaError, match="unknown augmentation 'heavy'"):
        dataset.make_batches(samples, Charset(DIGITS), 4, dataset.Batching(augment="heavy"))
    assert train.main(["--data_dir", str(digits_folder), "--augment", "heavy", "--preset", "tiny"]) == 2
    assert "unknown --augment 'heavy'" in capsys.readouterr().err


def test_small_folders_get_enough_optimizer_steps():
    assert recipes.plan_epochs(0, 3000, 1872, 32) == (51, 1)  # 59 steps a pass: 51 epochs, 3,009 steps
    assert recipes.plan_epochs(0, 3000, 936, 32) == (51, 2)  # 30 steps a pass: 51 epochs of 59 steps (two passes)
    assert recipes.plan_epochs(0, 3000, 400, 32) == (60, 4)  # 13 steps a pass: 60 epochs of 50 steps, 3,000 steps
    assert recipes.plan_epochs(0, 3000, 20000, 32) == (recipes.DEFAULT_EPOCHS, 1)  # 20,000 images: the usual 30
    assert recipes.plan_epochs(7, 3000, 936, 32) == (7, 1)  # --epochs given: exactly that


def test_a_one_cycle_run_is_never_stopped_on_patience_and_the_reference_recipe_is(capsys):
    assert callbacks.early_stopping(recipes.RECIPES["default"]) is None  # it runs its whole schedule
    reference = callbacks.early_stopping(recipes.RECIPES["reference"])
    assert reference.start_from_epoch == 0 and reference.patience == 5 and reference.monitor == "val_loss"
    assert reference.restore_best_weights
    # --patience: the recipe's unless given; given to a one-cycle run, it says it is not used
    assert recipes.with_flags("reference", patience=3).stop_patience == 3
    assert recipes.with_flags("reference").stop_patience == 5
    assert recipes.with_flags("default", patience=3).stop_patience == 3
    assert "--patience 3: not used, a one-cycle run" in capsys.readouterr().out
    assert recipes.RECIPES["default"].settle_epochs == 10  # it ends once validation has settled; the peers' never do
    assert recipes.RECIPES["reference"].settle_epochs == recipes.RECIPES["kerasio"].settle_epochs == 0


def test_a_run_with_epochs_0_plans_its_epochs_from_min_steps(digits_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(digits_folder), "--preset", "tiny", "--charset", DIGITS, "--batch_size", "16",
                       "--epochs", "0", "--min_steps", "1", "--workers", "1", "--out", str(out)]) == 0
    # 32 training images at batch 16: 2 steps a pass, so 25 passes an epoch (50 steps) and 30 passes in all
    assert "2 epochs of 50 steps = 100 optimizer steps (25 passes over the training images an epoch)" in \
        capsys.readouterr().out


def test_the_built_in_run_on_a_cpu_is_sized_in_steps():
    assert recipes.cpu_builtin_epochs(16000, 32) == 6  # 500 steps an epoch: 3,000 steps
    assert recipes.cpu_builtin_epochs(100, 32) == 750  # 4 steps an epoch
    assert recipes.cpu_builtin_epochs(10**6, 32) == 1


def test_only_the_built_in_run_is_sized_for_a_cpu(monkeypatch):
    monkeypatch.setattr(runlength.model, "gpu_names", lambda: [])
    assert runlength.cpu_sized(runlength.LengthFlags())  # no folder: the built-in synthetic captchas
    assert not runlength.cpu_sized(runlength.LengthFlags(epochs=6))
    assert not runlength.cpu_sized(runlength.LengthFlags(data_dir="site"))
    assert not runlength.cpu_sized(runlength.LengthFlags(check="checked"))  # a teacher's pseudo-labels: sized as any folder
    # the built-in run follows its validation too, with the CPU's steps as its ceiling
    length = runlength.plan(runlength.LengthFlags(), recipes.RECIPES["default"], 16000)
    assert length.follows_validation and length.epochs * length.epoch_steps == recipes.CPU_BUILTIN_STEPS
    monkeypatch.setattr(runlength.model, "gpu_names", lambda: ["GPU:0"])
    assert not runlength.cpu_sized(runlength.LengthFlags())
