"""Read captchas with a trained model.

    python test.py --model saved_model/crnn_ctc_best.keras --image path/to/captcha.png
    python test.py --model saved_model/crnn_ctc_best.keras --folder path/to/images --limit 50

Prints `path -> text` per image. Preprocessing repeats what the model was trained with (saved
inside the model); the flags below change it. When file names are labels (aB3xQ.png), also prints
exact match and CER.
"""

import argparse
import csv
import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import model  # first: it quiets TensorFlow's logging before Keras loads it
import cv2
import numpy as np
from tqdm import tqdm

import metrics
import preprocess
from preprocess import CaptchaError, Charset, PreprocessOptions


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="saved_model/crnn_ctc_best.keras",
                        help="a .keras file from train.py, or an .onnx file from export_safe.py --format onnx")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one captcha image")
    source.add_argument("--folder", help="a folder of captcha images (sub-folders too)")
    parser.add_argument("--limit", type=int, default=0, help="read at most this many images of --folder (0: all)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--beam_width", type=int, default=0, help="CTC beam search width (0: greedy decoding)")
    parser.add_argument("--no_auto_crop", action="store_true", help="do not crop to the text")
    parser.add_argument("--force_invert", action="store_true", help="invert colours (light text on dark)")
    parser.add_argument("--strong", action="store_true", help="thicken thin strokes")
    parser.add_argument("--save_debug", metavar="DIR", help="write every preprocessing stage of each image here")
    parser.add_argument("--output", metavar="CSV", help="also write path,prediction[,label] rows here")
    parser.add_argument("--charset", help="the symbols you expect the model to read (preset name or symbols): "
                                          "a model trained on others is refused")
    parser.add_argument("--unsafe", action="store_true",
                        help="load models with Lambda layers, running code stored in the file: only for files you trust")
    return parser.parse_args(argv)


def inference_options(meta, args):
    """The model's own preprocessing, changed only where the user asked."""
    options = PreprocessOptions.from_dict(meta["preprocess"])  # resize mode and CLAHE settings included
    return dataclasses.replace(
        options,
        auto_crop=options.auto_crop and not args.no_auto_crop,
        force_invert=options.force_invert or args.force_invert,
        strong=options.strong or args.strong,
    )


def prepare(path, options, debug_dir):
    """-> (model input, None) or (None, error message). Writes the stages when debugging."""
    try:
        stages = {} if debug_dir else None
        image = preprocess.preprocess_gray(preprocess.read_gray(path), options, stages)
    except CaptchaError as e:
        return None, str(e)
    if debug_dir:
        for name, stage in stages.items():
            cv2.imwrite(str(Path(debug_dir) / f"{Path(path).stem}_{name}.png"), stage)
    return image, None


def predict_paths(crnn, charset, paths, options, batch_size=64, beam_width=0, debug_dir=None):
    """Yield (path, text or None, error or None) in order; reads the next batch while predicting this one."""
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    # One thread prepares the next batch, spreading its images over two more (OpenCV frees the GIL).
    with ThreadPoolExecutor(1) as prefetch, ThreadPoolExecutor(2) as pool:
        def load(batch):
            return list(pool.map(lambda p: prepare(p, options, debug_dir), batch))

        pending = prefetch.submit(load, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            prepared = pending.result()
            pending = prefetch.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
            good = [image for image, error in prepared if error is None]
            texts = iter(model.decode(crnn.predict_on_batch(np.stack(good)), charset, beam_width) if good else [])
            for path, (image, error) in zip(batch, prepared):
                yield (path, None, error) if error else (path, next(texts), None)


def main(argv=None):
    args = parse_args(argv)
    try:
        crnn, meta = model.load_model(args.model, safe_mode=not args.unsafe)
        charset = Charset.from_dict(meta["charset"])
        if args.charset and preprocess.charset_from_arg(args.charset).symbols != charset.symbols:
            expected = preprocess.charset_from_arg(args.charset).symbols
            raise CaptchaError(f"{args.model}: reads {charset.symbols!r}, not the --charset you gave ({expected!r})")
        options = inference_options(meta, args)
        if args.image:
            if not Path(args.image).is_file():
                raise CaptchaError(f"{args.image}: image file does not exist")
            paths = [Path(args.image)]
        else:
            paths = preprocess.list_images(args.folder)
            if not paths:
                raise CaptchaError(f"{args.folder}: no image files (png, jpg, bmp, webp, gif, tif)")
            if args.limit:
                paths = paths[: args.limit]
        if args.save_debug:
            Path(args.save_debug).mkdir(parents=True, exist_ok=True)
    except CaptchaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows, failures, started = [], 0, time.perf_counter()
    # A progress bar on terminals only; tqdm.write keeps result lines from tearing it.
    progress = tqdm(total=len(paths), unit="img", desc="reading", disable=len(paths) < 2 or not sys.stderr.isatty())
    for path, text, error in predict_paths(crnn, charset, paths, options, args.batch_size, args.beam_width,
                                           args.save_debug):
        progress.update()
        if error:
            failures += 1
            tqdm.write(f"skipped: {error}", file=sys.stderr)
            continue
        tqdm.write(f"{path} -> {text}")
        rows.append((str(path), text, preprocess.label_from_filename(path)))
    progress.close()
    seconds = time.perf_counter() - started
    if len(paths) > 1:
        print(f"read {len(rows)} images in {seconds:.2f} s ({len(rows) / seconds:.1f} images/s, reading files included)",
              file=sys.stderr)

    # File names count as labels only where they could be labels of this model (IMG_1234.png is not).
    labelled, unscored = [], {}
    for path, text, label in rows:
        reason = metrics.unscorable_reason(label, charset, meta.get("max_len"))
        if reason:
            unscored[reason] = unscored.get(reason, 0) + 1
        else:
            labelled.append((text, label))
    if labelled:
        scores = metrics.score(*map(list, zip(*labelled)))
        print(f"{scores['count']} labelled image{'s' if scores['count'] != 1 else ''}: exact match "
              f"{scores['exact_match']:.4f} ({scores['exact_match_ignore_case']:.4f} ignoring case), "
              f"CER {scores['cer']:.4f}")
    if unscored and len(rows) > 1:
        print(f"not scored, file name not a label of this model: "
              + ", ".join(f"{n} {reason}" for reason, n in sorted(unscored.items())))
    if failures:
        print(f"{failures} of {len(paths)} images could not be read (see above)", file=sys.stderr)
    if args.output:
        with open(args.output, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "prediction", "label"])
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
