"""A run's state on disk: its files, its identity (which images train, validate and test, read how), the
check that a resume continues the same run, and its log as a resume reads it back."""

import csv
import hashlib
import json
import os

from errors import CaptchaError

BEST_NAME = "crnn_ctc_best.keras"
FINAL_NAME = "crnn_ctc_final.keras"
LOWEST_VAL_NAME = "crnn_ctc_lowest_val_cer.keras"  # the epoch of lowest validation CER, when the final one is kept
RESUME_NAME = "crnn_ctc_resume.keras"  # after every epoch: weights, optimizer state, where training stands
LOG_NAME = "train_log.csv"


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


def keep_log_rows_before(log_path, epoch):
    """Drop log rows of epochs that will run again after a resume. A log with no rows (the run stopped before
    its first epoch ended) is left empty, so the resumed run's logger writes the header."""
    if not log_path.exists():
        return
    with open(log_path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",")[0]) < epoch]
    log_path.write_text("".join(line + "\n" for line in kept))


def validation_history(log_path, with_loss=False):
    """(val_cer, val_exact_match[, val_loss]) of each epoch in a run's log, for callbacks that look back after a
    resume."""
    if not log_path.exists():
        return []
    columns = ("val_cer", "val_exact_match") + (("val_loss",) if with_loss else ())
    with open(log_path) as f:
        return [tuple(float(row[column]) for column in columns) for row in csv.DictReader(f)]
