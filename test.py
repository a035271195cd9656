"""Read captchas with a trained model.

    python test.py --model saved_model/crnn_ctc_best.keras --image path/to/captcha.png
    python test.py --model saved_model/crnn_ctc_best.onnx --folder path/to/images --output readings.json
    python test.py --model M --folder D --min_confidence 0.5 --review_dir to_relabel/
    python test.py --model M --image F --colour red              # a model trained with the asked colour
    python test.py --model M --folder D --labels labels.csv     # file,label,colour: each read with its own colour

Prints `path -> text (confidence)` per image. Preprocessing and the letter-case fold repeat what the
model was trained with (saved inside the model); the flags below change them. Where the images have
labels (read from the file names by the rule the model was trained with, or --labels_from / --labels),
also prints exact match and CER, labels and readings folded alike. Reading an .onnx or .tflite model
never loads TensorFlow.
"""

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

import cli
import arithmetic
import label_sources
import metrics
import charsets
import imagefiles
import reader
import teacher
from errors import CaptchaError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="saved_model/crnn_ctc_best.keras",
                        help="a .keras file from train.py, an .onnx/.tflite file from export_safe.py, or ddddocr "
                             "(the zero-shot teacher: pip install ddddocr)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one captcha image")
    source.add_argument("--folder", help="a folder of captcha images (sub-folders too)")
    parser.add_argument("--limit", type=int, default=0, help="read at most this many images of --folder (0: all)")
    parser.add_argument("--colour", "--color", dest="colour",
                        help="the colour the captchas ask for (\"type the red characters\"), for a model trained with "
                             "a labels file's colour column; --labels with such a column gives each image its own")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--beam_width", type=int, default=0, help="CTC beam search width (0: greedy decoding)")
    parser.add_argument("--allowed", help="read only these symbols (e.g. 0123456789, or a preset: digits, lower, "
                                          "upper, lower_digits, upper_digits); the others are masked before decoding")
    parser.add_argument("--case", choices=(*reader.CASES, "keep"),
                        help="fold letter case (for sites that ignore it): each letter's two cases count as one, in "
                             "readings and labels alike; keep: no fold (default: the model's own, stored in it)")
    label_sources.add_label_flags(parser, unset_means="as the model was trained: its rule, and joined spaces if its "
                                                      "labels were joined")
    parser.add_argument("--answer", choices=arithmetic.ANSWERS,
                        help="arithmetic: the captcha shows an expression (3+5=?); print its value too, and mark a "
                             "reading that is no expression low (default: as the model was trained)")
    parser.add_argument("--min_confidence", type=float,
                        help="mark readings below this confidence (0-1) as low: a caller should fetch a new captcha "
                             "(default: the threshold stored in the model, chosen on its validation split for a "
                             "stated precision; 0: no threshold). Readings of a length no label typed for the model "
                             "has are marked low too")
    parser.add_argument("--review_dir", metavar="DIR",
                        help="copy misread images (prediction differs from the file-name label) and low-confidence "
                             "ones here, named <prediction>__<original name>, for relabelling")
    parser.add_argument("--no_auto_crop", action="store_true", help="do not crop to the text")
    parser.add_argument("--force_invert", action="store_true", help="invert colours (light text on dark)")
    parser.add_argument("--strong", action="store_true", help="thicken thin strokes")
    parser.add_argument("--save_debug", metavar="DIR", help="write every preprocessing stage of each image here")
    parser.add_argument("--output", metavar="FILE", help="also write the readings here: .json, or CSV "
                                                         "(path,prediction,confidence,low_confidence,label)")
    parser.add_argument("--charset", help="the symbols you expect the model to read (preset name or symbols): "
                                          "a model trained on others is refused")
    parser.add_argument("--unsafe", action="store_true",
                        help="load models with Lambda layers, running code stored in the file: only for files you trust")
    return parser.parse_args(argv)


def known_labels(args, meta):
    """({path: label} for the images to read, from --labels, --labels_from or the model's own rule, {path: the
    colour it asks for} from --labels' colour column, why there are no labels (None if there are)). A folder whose
    names auto cannot read as labels is read, not scored."""
    stored = meta.get("labels", {}).get("rule", "name")
    spaces = args.label_spaces or ("join" if meta.get("labels", {}).get("spaces") == "join" else "auto")
    folder = Path(args.folder) if args.folder else Path(args.image).parent
    if args.labels:
        found = label_sources.find_labels(folder, labels_file=args.labels, spaces=spaces)
        if found.decision:
            print(found.decision, file=sys.stderr)
        return dict(found.samples), found.asked, None
    else:
        rule = args.labels_from or (stored if stored != "file" else "auto")
        if args.image and rule == "auto":  # one name is too few to decide from
            rule = "name"
        if args.image:
            label_sources.check_rule(rule)
            label = label_sources.label_from_filename(args.image, rule)
            if label and spaces == "join":
                label = label_sources.join_symbols(label)
            return ({str(Path(args.image)): label} if label else {}), {}, None
        try:
            found = label_sources.find_labels(folder, rule, spaces=spaces)
        except CaptchaError as e:
            if args.labels_from:
                raise
            return {}, {}, str(e)
    if found.decision:
        print(found.decision, file=sys.stderr)
    return dict(found.samples), {}, None


def asked_colours(args, captcha_reader, paths, asked):
    """{path: the colour to read it with}: --labels' colour column, else --colour for every image. Refused in one
    line when the model reads an asked colour and none is given, or when one is given to a model that reads none."""
    colours = getattr(captcha_reader, "colours", ())  # a model trained with them needs one
    known = colours or getattr(captcha_reader, "colour_filter", ())  # ddddocr reads with or without one
    if args.colour and asked:
        raise CaptchaError("--colour and a labels file with a colour column: give one of them")
    if args.colour:
        asked = {str(path): charsets.colour_name(args.colour) for path in paths}
    if asked and not known:
        raise CaptchaError(f"{args.model}: not trained with an asked colour, so it cannot be told one (--colour or "
                           f"a labels file's colour column)")
    if colours and not asked:
        raise CaptchaError(f"{args.model}: reads the colour each captcha asks for: give --colour (one of "
                           f"{', '.join(colours)}), or --labels with a colour column")
    unknown = sorted(set(asked.values()) - set(known))
    if unknown:
        raise CaptchaError(f"unknown colour {unknown[0]!r}: {args.model} knows {', '.join(known)}")
    return asked


def review_name(prediction, path):
    """<prediction>__<original name>; a prediction's path separators would make folders, so they go."""
    return f"{prediction.replace('/', '_').replace(chr(92), '_')}__{Path(path).name}"


def open_reader(args):
    """The model (or ddddocr), checked against --charset and --min_confidence."""
    if args.model == teacher.DDDDOCR:  # the zero-shot teacher, to see what it reads before any training
        return teacher.DdddocrReader(args.case, args.answer, args.min_confidence)
    captcha_reader = reader.Reader.load(args.model, safe_mode=not args.unsafe, allowed=args.allowed, case=args.case,
                                        beam_width=args.beam_width, no_auto_crop=args.no_auto_crop,
                                        force_invert=args.force_invert, strong=args.strong, answer=args.answer,
                                        min_confidence=args.min_confidence)
    if args.charset and charsets.charset_from_arg(args.charset).symbols != captcha_reader.charset.symbols:
        expected = charsets.charset_from_arg(args.charset).symbols
        raise CaptchaError(f"{args.model}: reads {captcha_reader.charset.symbols!r}, not the --charset you gave "
                           f"({expected!r})")
    return captcha_reader


def images_to_read(args):
    if args.image:
        if not Path(args.image).is_file():
            raise CaptchaError(f"{args.image}: image file does not exist")
        return [Path(args.image)]
    paths = imagefiles.list_images(args.folder)
    if not paths:
        raise CaptchaError(f"{args.folder}: no image files (png, jpg, bmp, webp, gif, tif)")
    return paths[: args.limit] if args.limit else paths


def read_all(args, captcha_reader, paths, label_of, low_rule, asked=None):
    """Reads every image (with its asked colour, if any), printing a line each; -> (rows, images that could not be
    read, images copied to review)."""
    charset, max_len = captcha_reader.charset, captcha_reader.meta.get("max_len")
    rows, failures, reviewed = [], 0, 0
    # A progress bar on terminals only; tqdm.write keeps result lines from tearing it.
    progress = tqdm(total=len(paths), unit="img", desc="reading", disable=len(paths) < 2 or not sys.stderr.isatty())
    for reading in captcha_reader.read_paths(paths, args.batch_size, args.save_debug, asked=asked):
        progress.update()
        if reading.error:
            failures += 1
            tqdm.write(f"skipped: {reading.error}", file=sys.stderr)
            continue
        result = reader.judged(reading.text, reading.confidence, reading.refit, low_rule, captcha_reader.answer)
        low, arithmetic_answer = result.low, captcha_reader.answer == "arithmetic"
        shown = reading.text if not arithmetic_answer else \
            f"{reading.text} = {result.answer}" if result.answer is not None else f"{reading.text} (no answer: {result.reason})"
        tqdm.write(f"{reading.path} -> {shown} ({reading.confidence:.3g}{', LOW' if low else ''})")
        label = label_of.get(reading.path)
        if label is not None:  # labels folded as the readings are
            label = charsets.fold_case(label, captcha_reader.case)
        # File names count as labels only where they could be labels of this model (IMG_1234.png is not).
        unscorable = metrics.unscorable_reason(label, charset, max_len)
        row = {"path": reading.path, **({"colour": asked[reading.path]} if asked else {}), "prediction": reading.text, "confidence": float(f"{reading.confidence:.6g}"),
               "low_confidence": low, "label": None if unscorable else label, "unscorable": unscorable}
        if arithmetic_answer:  # a label is the expression as drawn; its value is what the site checks
            row.update(answer=result.answer, answer_error=result.reason,
                       label_answer=arithmetic.answer(label).value if label else None)
        rows.append(row)
        if args.review_dir and (low or (not unscorable and reading.text != label)):
            shutil.copy2(reading.path, Path(args.review_dir) / review_name(reading.text, reading.path))
            reviewed += 1
    progress.close()
    return rows, failures, reviewed


def report(rows, low_rule, answer_mode):
    """Scores against the labels (and, for arithmetic, the answers), what was not scored and why, what is low."""
    labelled = [(row["prediction"], row["label"]) for row in rows if row["label"] is not None]
    scores = metrics.score(*map(list, zip(*labelled))) if labelled else None
    if scores:
        print(f"{scores['count']} labelled image{'s' if scores['count'] != 1 else ''}: exact match "
              f"{scores['exact_match']:.4f} ({scores['exact_match_ignore_case']:.4f} ignoring case), "
              f"CER {scores['cer']:.4f}")
    answered = [row for row in rows if row.get("label_answer") is not None]
    if answered:  # --answer arithmetic, over every label that is an expression (of this model's symbols or not)
        right = sum(row["answer"] == row["label_answer"] for row in answered)
        scores = {**(scores or {}), "answer_accuracy": right / len(answered), "answer_count": len(answered)}
        print(f"answers right: {right} of {len(answered)} ({right / len(answered):.4f})")
    unscored = {}
    for row in rows:
        if row["unscorable"]:
            unscored.setdefault(row["unscorable"], []).append(Path(row["path"]).name)
    if unscored and len(rows) > 1:  # counts by reason with an example each: one line however many files
        print("not scored, file name not a label of this model: "
              + ", ".join(f"{len(names)} {reason} (e.g. {names[0]})" for reason, names in sorted(unscored.items()))
              + "; --labels FILE or --labels_from RULE scores them otherwise")
    if low_rule.threshold or low_rule.lengths or answer_mode == "arithmetic":
        print(f"{sum(row['low_confidence'] for row in rows)} of {len(rows)} readings marked low (below confidence "
              f"{low_rule.threshold:.4g}, of a length no typed label has"
              f"{', or with no answer' if answer_mode == 'arithmetic' else ''})")
    return scores


def main(argv=None):
    args = parse_args(argv)
    # ---- the model, the images and their labels
    try:
        paths = images_to_read(args)  # before the model: a wrong folder is refused before TensorFlow loads
        captcha_reader = open_reader(args)
        for folder in (args.save_debug, args.review_dir):
            if folder:
                Path(folder).mkdir(parents=True, exist_ok=True)
        label_of, asked, unlabelled_why = known_labels(args, captcha_reader.meta)
        asked = asked_colours(args, captcha_reader, paths, asked)
    except (CaptchaError, OSError) as e:
        return cli.user_error(e)
    low_rule = captcha_reader.low_rule
    print(low_rule.description, file=sys.stderr)
    if unlabelled_why:
        print(f"not scored: {unlabelled_why}", file=sys.stderr)
    # ---- reading
    started = time.perf_counter()
    rows, failures, reviewed = read_all(args, captcha_reader, paths, label_of, low_rule, asked)
    seconds = time.perf_counter() - started
    if len(paths) > 1:
        print(f"read {len(rows)} images in {seconds:.2f} s ({len(rows) / seconds:.1f} images/s, reading files included)",
              file=sys.stderr)
    # ---- scores and what was set aside
    scores = report(rows, low_rule, captcha_reader.answer)
    if args.review_dir:
        print(f"copied {reviewed} images to review into {args.review_dir} (named <prediction>__<file name>)")
    if failures:
        print(f"{failures} of {len(paths)} images could not be read (see above)", file=sys.stderr)
    if args.output:
        write_output(Path(args.output), rows, scores, args, low_rule)
    return 2 if failures and not rows else 0  # nothing could be read: the caller must not take it for a result


def write_output(path, rows, scores, args, low_rule):
    if path.suffix.lower() == ".json":
        settings = {"model": args.model, "allowed": args.allowed, "case": args.case, "beam_width": args.beam_width,
                    "min_confidence": low_rule.threshold if math.isfinite(low_rule.threshold) else None,
                    "label_lengths": low_rule.lengths}
        path.write_text(json.dumps({"settings": settings, "scores": scores, "readings": rows}, indent=2))
        return
    answers = any("answer" in row for row in rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "prediction", "confidence", "low_confidence", "label"] + ["answer"] * answers)
        writer.writerows([row["path"], row["prediction"], row["confidence"], int(row["low_confidence"]),
                          row["label"] or ""] + [row.get("answer") or ""] * answers for row in rows)


if __name__ == "__main__":
    sys.exit(main())
