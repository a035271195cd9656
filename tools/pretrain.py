"""Rebuild the base model that `python train.py` starts from (pretrained/base.keras): one recorded command,
resumable, that can run in slices, each continuing from the model the last one wrote.

    python tools/pretrain.py                                   # the recorded rebuild, from scratch, into runs/base
    python tools/pretrain.py --resume --out runs/base          # continue it after a crash, Ctrl-C or a session's end
    python tools/pretrain.py --init_from pretrained/base.keras --out runs/base_next   # a slice: more updates from the base
    KERAS_BACKEND=jax python tools/pretrain.py --batch_size 256 --processes 14 --workers 16 --cache_mb 8192  # a GPU machine
    python tools/pretrain.py --score pretrained/base.keras     # only read the held-out sets with a model
    cp runs/base/base.keras pretrained/base.keras        # ship it

1. the data: the pre-training styles (PRETRAIN_STYLES, `hershey` never among them), --count images each, labels
   of 3 to 8 of all 62 symbols, drawn once into --data_dir; a held-out set of every style, hershey included, drawn
   once into --heldout_dir with other seeds;
2. training: train.py's train() on --data_dir (its test split is the base model's own test split);
3. the run's model (train.py keeps the final epoch's unless the lowest validation CER is better beyond chance)
   read on each held-out style;
4. OUT/base.keras: that model without its optimizer state (safe-mode loadable, with its metadata), and
   OUT/pretrain.json: this command's settings, the test split's score and each held-out style's.
"""

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit's modules, one folder up

import callbacks
import cli
import finetune
import label_sources
import metrics
import model
import charsets
import imagefiles
import reader
import runstate
import synth
import train
from errors import CaptchaError

PRETRAIN_STYLES = ("captcha", "gregwar", "varied")  # hershey stays out: the look fine-tuning is measured on
STATE_NAME = "pretrain.json"


@dataclass
class PretrainConfig:
    data_dir: str = "data/base"  # the pre-training set, drawn here once (a folder per style)
    heldout_dir: str = "data/base_heldout"  # a held-out set of every style, hershey included, drawn here once
    styles: str = ",".join(PRETRAIN_STYLES)  # the styles pre-trained on (comma-separated; never hershey)
    count: int = 20000  # images of each style
    heldout_count: int = 500  # held-out images of each style
    length: str = "3-8"  # label lengths
    seed: int = 500  # style i of captcha, gregwar, varied, hershey is drawn with seed + i + 1 (held out: + i + 101)
    init_from: str = "none"  # none: from scratch; a .keras file: a slice that continues from it
    preset: str = "fast"  # the network (the base model that train.py starts from is a fast one)
    epochs: int = 12  # passes over the pre-training set in this slice (one one-cycle schedule over all of them)
    batch_size: int | None = None  # the default recipe's (32); larger on a GPU
    learning_rate: float | None = None  # the default recipe's peak
    workers: int = 2  # threads that make the training batches
    processes: int = 0  # worker processes that make them (for machines with many cores feeding a GPU)
    cache_mb: int = train.TrainConfig.cache_mb  # the decoded canvases stay in memory up to this many MiB
    #                                             (120,000 canvases of 50x200 gray take 1.1 GiB)
    out: str = "runs/base"
    resume: bool = False  # continue the interrupted command in --out with its own settings
    score: str = ""  # a .keras file: only read the held-out sets with it (drawn first if missing), train nothing


def style_seeds(cfg):
    """{style: (training seed, held-out seed)}: a style keeps its seeds whatever else is listed with it."""
    order = list(PRETRAIN_STYLES) + sorted(set(synth.SYNTH_STYLES) - set(PRETRAIN_STYLES))
    return {style: (cfg.seed + i + 1, cfg.seed + i + 101) for i, style in enumerate(order)}


def check(cfg):
    styles = cfg.styles.split(",")
    unknown = [s for s in styles if s not in synth.SYNTH_STYLES]
    if unknown:
        raise CaptchaError(f"--styles: unknown {unknown}; choose from {sorted(set(synth.SYNTH_STYLES) - {'hershey'})}")
    if "hershey" in styles:
        raise CaptchaError("--styles: hershey is the look kept out of pre-training, to measure fine-tuning on one "
                           "the base model never saw")
    return styles, synth.parse_length(cfg.length)


def draw_once(folder, style, count, seed, length):
    """`count` images of `style` in `folder`, drawn unless they are already there (the same seed draws the same)."""
    have = len(imagefiles.list_images(folder)) if Path(folder).is_dir() else 0
    if have >= count:
        return
    if have:
        raise CaptchaError(f"{folder}: holds {have} of the {count} images this command draws; remove it to redraw")
    synth.generate_synthetic(folder, count, synth.Drawing(style=style, symbols=charsets.DEFAULT_SYMBOLS, length=length), seed=seed)


def draw_heldout(cfg, length):
    seeds = style_seeds(cfg)
    for style in sorted(synth.SYNTH_STYLES):
        draw_once(Path(cfg.heldout_dir) / style, style, cfg.heldout_count, seeds[style][1], length)


def draw_data(cfg, styles, length):
    seeds = style_seeds(cfg)
    for style in styles:
        draw_once(Path(cfg.data_dir) / style, style, cfg.count, seeds[style][0], length)
    draw_heldout(cfg, length)
    print(f"pre-training set: {cfg.count} images of each of {', '.join(styles)} in {cfg.data_dir}; held out: "
          f"{cfg.heldout_count} of each of {', '.join(sorted(synth.SYNTH_STYLES))} in {cfg.heldout_dir}")


def score_heldout(model_path, heldout_dir):
    """{style: exact match, ignoring case, CER, count} of the model reading each held-out style's folder."""
    captcha_reader = reader.Reader(model_path)
    scores = {}
    for folder in sorted(p for p in Path(heldout_dir).iterdir() if p.is_dir()):
        paths = imagefiles.list_images(folder)
        readings = list(captcha_reader.read_paths(paths))
        truths = [label_sources.label_from_filename(p) for p in paths]
        scores[folder.name] = metrics.score([r.text or "" for r in readings], truths)
        print(f"held-out {folder.name}: exact match {scores[folder.name]['exact_match']:.4f} "
              f"({scores[folder.name]['exact_match_ignore_case']:.4f} ignoring case), "
              f"CER {scores[folder.name]['cer']:.4f} on {len(paths)} images")
    return scores


def train_config(cfg):
    # channels=1: the base reads gray, and a run on colour images widens its first convolution to colour exactly
    return train.TrainConfig(data_dir=cfg.data_dir, preset=cfg.preset, init_from=cfg.init_from, channels=1,
                             epochs=cfg.epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                             workers=cfg.workers, processes=cfg.processes, cache_mb=cfg.cache_mb, out=cfg.out)


def run(cfg):
    if cfg.score:
        if not Path(cfg.score).is_file():
            raise CaptchaError(f"{cfg.score}: model file does not exist")
        draw_heldout(cfg, check(cfg)[1])
        return {"heldout": score_heldout(cfg.score, cfg.heldout_dir)}
    out = Path(cfg.out)
    state_path = out / STATE_NAME
    if cfg.resume:  # the command's own settings, as it stored them when it started
        if not state_path.exists():
            raise CaptchaError(f"{state_path}: no pre-training to resume in {cfg.out}")
        saved = json.loads(state_path.read_text())["config"]
        cfg = PretrainConfig(**{**saved, "out": cfg.out, "resume": True})
        print(f"resuming the pre-training in {cfg.out} with its saved settings")
    # ---- 1. the data
    styles, length = check(cfg)
    draw_data(cfg, styles, length)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**dataclasses.asdict(cfg), "resume": False}  # what --resume reads back
    state_path.write_text(json.dumps({"config": settings}, indent=2))
    # ---- 2. training (a run whose training is complete has no resume checkpoint, but its metrics)
    stopped_in_training = (out / runstate.RESUME_NAME).exists()
    trained = cfg.resume and not stopped_in_training and (out / "metrics.json").exists()
    if not trained:
        run_config = dataclasses.replace(train_config(cfg), resume=cfg.resume and stopped_in_training)
        if train.train(run_config, resume_command=f"python tools/pretrain.py --resume --out {cfg.out}") is None:
            return None  # stopped: what is saved lets --resume continue
    # ---- 3. the held-out styles, 4. the base model without its optimizer state
    best = out / runstate.BEST_NAME
    heldout = score_heldout(best, cfg.heldout_dir)
    crnn, meta = model.load_model(best)
    model.save_model(crnn, out / "base.keras", meta)
    test = json.loads((out / "metrics.json").read_text())["test"]
    state = {"config": settings, "test": test, "heldout": heldout}
    state_path.write_text(json.dumps(state, indent=2))
    print(f"wrote {out / 'base.keras'} (own test split: exact match {test['exact_match']:.4f}, CER {test['cer']:.4f}) "
          f"and {state_path}" + (f"; ship it with: cp {out / 'base.keras'} {finetune.BASE_MODEL}"
                                 if cfg.preset == finetune.BASE_PRESET else ""))
    return state


def main(argv=None):
    cfg = cli.parse(PretrainConfig, argv, description=__doc__)
    finished = []
    with callbacks.stop_on_signals():
        status = cli.exit_status(lambda: finished.append(run(cfg) is not None), OSError)
    return status or (0 if finished[0] else callbacks.stopped_status())


if __name__ == "__main__":
    sys.exit(main())
