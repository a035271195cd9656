"""Bad input refused before TensorFlow loads: train.py and export_safe.py run these first when started as scripts,
so a folder that cannot train or a missing file is one line within a second or two, not after the seconds that
importing TensorFlow takes. The scripts check the same things again where they use them (with the same code, e.g.
labels.find_labels), so these are an early copy of their refusals, never a different rule.

Only the flags checked here are read (argparse's parse_known_args); the script's own parser reads them all.
"""

import argparse
import sys
from pathlib import Path

import cli
import label_sources
from errors import CaptchaError
from imagefiles import list_images


def teacher_reads_unlabeled(teacher, unlabeled):
    if teacher and not unlabeled:
        raise CaptchaError(f"--teacher {teacher} reads the images of --unlabeled: give that folder too")


def train_inputs(argv):
    """train.py: the folders it reads and how their labels are read."""
    parser = argparse.ArgumentParser(add_help=False)
    label_sources.add_label_flags(parser, unset="")
    for flag in ("--data_dir", "--unlabeled", "--check", "--check_labels", "--teacher", "--unlabeled_labels"):
        parser.add_argument(flag, default="")
    parser.add_argument("--resume", action="store_true")
    args, _ = parser.parse_known_args(argv)
    if args.resume or "-h" in argv or "--help" in argv:
        return  # a resumed run reads its folder as it was stored
    teacher_reads_unlabeled(args.teacher, args.unlabeled)
    if args.data_dir:
        label_sources.find_labels(args.data_dir, args.labels_from or "auto", args.labels or None,
                                  args.label_spaces or "auto")
    for flag, folder in (("--unlabeled", args.unlabeled), ("--check", args.check)):
        if folder and not list_images(folder):
            raise CaptchaError(f"{folder}: no image files ({flag})")
    if args.check:
        label_sources.find_labels(args.check, args.labels_from or "auto", args.check_labels or None,
                                  args.label_spaces or "auto")
    if args.unlabeled_labels:
        if not args.unlabeled:
            raise CaptchaError(f"--unlabeled_labels {args.unlabeled_labels} gives the colours of --unlabeled's images: "
                               f"give that folder too")
        label_sources.asked_colours(args.unlabeled, args.unlabeled_labels)


def files_exist(argv, flag, what):
    """The file `flag` names exists (when it is given)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(flag, default="")
    args, _ = parser.parse_known_args(argv)
    path = getattr(args, flag.lstrip("-"))
    if path and not Path(path).exists():
        raise CaptchaError(f"{path}: {what} does not exist")


def exit_on_bad_input(check, *args):
    """Runs check(sys.argv[1:], *args); a CaptchaError ends the script with its one line and status 2."""
    try:
        check(sys.argv[1:], *args)
    except CaptchaError as e:
        sys.exit(cli.user_error(e))
