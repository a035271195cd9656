"""Pictures of a run, as PNG files: training curves, predictions against the truth, confused characters."""

import csv
from collections import Counter
from pathlib import Path

# Figure without pyplot: no GUI backend and no global state, so this works on servers and in CI, and
# leaves a notebook's own inline plotting alone.
from matplotlib.figure import Figure
from rapidfuzz.distance import Levenshtein


def read_log(log_path):
    with open(log_path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def training_curves(log_path, out_path):
    """Loss, validation exact match and validation CER per epoch, from train.py's CSV log."""
    rows = read_log(log_path)
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(epochs, [r["loss"] for r in rows], "o-", label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    axes[0].set(title="CTC loss", xlabel="epoch", yscale="log")
    axes[0].legend()
    axes[1].plot(epochs, [r["val_exact_match"] for r in rows], "o-", color="tab:green")
    axes[1].set(title="validation exact match", xlabel="epoch", ylim=(0, 1))
    axes[2].plot(epochs, [r["val_cer"] for r in rows], "o-", color="tab:red")
    axes[2].set(title="validation CER", xlabel="epoch", ylim=(0, max(1.0, max(r["val_cer"] for r in rows))))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    return out_path


def prediction_grid(images, truths, predictions, out_path, columns=4, limit=24):
    """Model inputs with 'prediction (truth)' above each; wrong ones in red."""
    count = min(limit, len(images))
    rows = max(1, (count + columns - 1) // columns)
    fig = Figure(figsize=(3.2 * columns, 1.25 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        image = images[i][..., ::-1] if images[i].shape[-1] == 3 else images[i].squeeze()  # colour: BGR -> RGB
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        right = predictions[i] == truths[i]
        ax.set_title(predictions[i] if right else f"{predictions[i] or '(empty)'} ({truths[i]})",
                     color="black" if right else "red", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    return out_path


def confusions(truths, predictions, top=15):
    """Most frequent (true, predicted) character substitutions, from an edit-distance alignment."""
    counts = Counter()
    for truth, prediction in zip(truths, predictions):
        for op in Levenshtein.editops(truth, prediction):
            if op.tag == "replace":
                counts[(truth[op.src_pos], prediction[op.dest_pos])] += 1
    return counts.most_common(top)


def confusion_chart(truths, predictions, out_path, top=15):
    pairs = confusions(truths, predictions, top)
    fig = Figure(figsize=(7, 0.3 * max(len(pairs), 3) + 1))
    ax = fig.subplots()
    if pairs:
        ax.barh([f"{t} -> {p}" for (t, p), _ in reversed(pairs)], [n for _, n in reversed(pairs)])
        ax.set(xlabel="times read wrong", title="most confused characters (truth -> read as)")
    else:
        ax.text(0.5, 0.5, "no substituted characters", ha="center", va="center")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    return out_path


def style_samples(out_path, count=6, seed=1):
    """Raw captchas of every built-in synthetic style, a row each, labelled with their text."""
    import tempfile

    import label_sources
    import preprocess
    import synth

    styles = sorted(synth.SYNTH_STYLES)
    fig = Figure(figsize=(2.6 * count, 1.2 * len(styles)))
    axes = fig.subplots(len(styles), count, squeeze=False)
    with tempfile.TemporaryDirectory() as tmp:
        for row, style in zip(axes, styles):
            paths = synth.generate_synthetic(Path(tmp) / style, count, synth.Drawing(style=style), seed=seed, workers=1, progress=False)
            for ax, path in zip(row, paths):
                ax.imshow(preprocess.read_gray(path), cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{style}: {label_sources.label_from_filename(path)}", fontsize=9)
                ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    return out_path


def augmentation_samples(out_path, image_paths=(), epochs=3, seed=0):
    """Each image as the network sees it in validation (left), then as the training loader alters it in
    `epochs` epochs of `light` and of `strong` augmentation. Without image_paths: one captcha of each
    built-in synthetic style."""
    import tempfile

    import charsets
    import dataset
    import label_sources
    import preprocess
    import synth

    levels = ["light", "strong"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = list(image_paths) or [synth.generate_synthetic(Path(tmp) / style, 1, synth.Drawing(style=style), seed=seed + 3, workers=1, progress=False)[0]
                                      for style in sorted(synth.SYNTH_STYLES)]
        columns = 1 + epochs * len(levels)
        fig = Figure(figsize=(2.2 * columns, 0.8 * len(paths) + 0.3))
        axes = fig.subplots(len(paths), columns, squeeze=False)
        for row, path in zip(axes, paths):
            label = label_sources.label_from_filename(path)
            charset = charsets.charset_of_labels([label])
            row[0].imshow(preprocess.load_image(path).squeeze(), cmap="gray", vmin=0, vmax=1)
            row[0].set_title(f"{label}: as read", fontsize=8)
            for i, level in enumerate(levels):  # the training loader itself, epoch after epoch
                batches = dataset.make_batches([(str(path), label)], charset, len(label), dataset.Batching(batch_size=1, seed=seed, augment=level), workers=1)
                for epoch in range(epochs):
                    ax = row[1 + i * epochs + epoch]
                    ax.imshow(batches[0][0][0].squeeze(), cmap="gray", vmin=0, vmax=1)
                    ax.set_title(f"{level}, epoch {epoch + 1}", fontsize=8)
                    batches.on_epoch_end()
        for ax in axes.flat:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_path, dpi=80)
    return out_path


def text_fonts():
    """Matplotlib's font, then a CJK one where it is installed (synth.CJK_FONTS), so hanzi labels are drawn."""
    from matplotlib import font_manager

    import synth

    families = ["DejaVu Sans"]
    installed = next((path for path in synth.CJK_FONTS if Path(path).is_file()), None)
    if installed:
        font_manager.fontManager.addfont(installed)
        families.append(font_manager.FontProperties(fname=installed).get_name())
    return {"font.family": families}


def write_run_plots(out_dir, log_path, images, truths, predictions):
    import matplotlib

    out_dir = Path(out_dir)
    with matplotlib.rc_context(text_fonts()):  # for these figures only: a notebook's own settings stay
        return [
            training_curves(log_path, out_dir / "training_curves.png"),
            prediction_grid(images, truths, predictions, out_dir / "predictions.png"),
            confusion_chart(truths, predictions, out_dir / "confusions.png"),
        ]


def main(argv=None):
    """Redraw the plots of a finished train.py run from its --out folder (or draw style samples).

    From what the run wrote, never from a rescan of the data folder: its log, its test split's readings
    in metrics.json, and the preprocessing stored in its best checkpoint."""
    import argparse
    import json

    import numpy as np

    import cli
    import errors
    import modelmeta
    import preprocess

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run", nargs="?", help="a train.py --out folder (metrics.json, train_log.csv, crnn_ctc_best.keras)")
    parser.add_argument("--samples", metavar="PNG", help="instead, draw samples of each synthetic style into PNG")
    parser.add_argument("--augmentation", metavar="PNG",
                        help="instead, draw training augmentation of the images given after it (or of synthetic ones)")
    parser.add_argument("images", nargs="*", help="with --augmentation: image files to show")
    args = parser.parse_args(argv)
    if args.samples:
        print(f"wrote {style_samples(args.samples)}")
        return 0
    if args.augmentation:
        print(f"wrote {augmentation_samples(args.augmentation, ([args.run] if args.run else []) + args.images)}")
        return 0
    if not args.run:
        parser.error("give a run folder, or --samples PNG")
    run = Path(args.run)
    try:
        metrics_path = run / "metrics.json"
        if not metrics_path.exists():
            raise errors.CaptchaError(f"{metrics_path}: not found; is {run} a finished train.py run?")
        results = json.loads(metrics_path.read_text())
        if "readings" not in results:
            raise errors.CaptchaError(f"{metrics_path}: written by an older release, without the test split's "
                                          f"readings to draw")
        readings = results["readings"]
        checkpoint = run / Path(results["checkpoint"]).name
        meta = modelmeta.read_meta(checkpoint)
        if meta is None:
            raise errors.CaptchaError(f"{checkpoint}: no metadata; not a checkpoint of this run")
        options = preprocess.PreprocessOptions.from_dict(meta["preprocess"]).image_only()
        shown = readings[:24]  # the test images themselves: one gone or unreadable is named and refused
        images = np.stack([preprocess.load_image(r["path"], options) for r in shown]) if shown else np.zeros((0,))
        written = write_run_plots(run, run / Path(results["log"]).name, images, [r["truth"] for r in readings],
                                  [r["prediction"] for r in readings])
    except errors.CaptchaError as e:
        return cli.user_error(e)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
