"""Fine-tuning: the model a run starts from (the shipped base model, or a .keras file), the network and pixels
that implies, its weights carried into this run's network (output rows by symbol, a gray first convolution
widened to colour), and training with the convolutions frozen first, then thawed."""

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import quiet  # noqa: F401  (first: TensorFlow's start-up lines off; quiet.py)
import keras
import numpy as np

import model
import preprocess
from charsets import Charset
from errors import CaptchaError
from preprocess import Canvas, PreprocessOptions

BASE_MODEL = Path(__file__).resolve().parent / "pretrained" / "base.keras"  # --init_from base
BASE_PRESET = "fast"  # the network of the base model
BASE_RECIPE = "default"  # the recipe it was trained with


def resolve_init_from(init_from, preset, recipe):
    """The model file to start from (--init_from), or None to train from scratch. The shipped base model is a
    `fast` network trained with the default recipe: it is the start only for runs of that network and recipe."""
    if init_from in ("", "none"):
        return None
    if init_from != "base":
        return Path(init_from)
    if preset != BASE_PRESET or recipe != BASE_RECIPE:
        print(f"--init_from base: not used, the base model is a '{BASE_PRESET}' network for the {BASE_RECIPE} recipe "
              f"(this run: --preset {preset} --recipe {recipe}); training from scratch")
        return None
    if not BASE_MODEL.exists():
        raise CaptchaError(f"{BASE_MODEL}: the base model is missing from this checkout; rebuild it (see "
                           f"{BASE_MODEL.parent / 'README.md'}) or pass --init_from none")
    return BASE_MODEL


def load_start(init_from):
    """The model to start from (a .keras path), its metadata, its network (a ModelConfig, or None for a file
    without one) and the pixels it learned from: its input size, resize arithmetic and CLAHE settings."""
    source_model, source_meta = model.load_model(init_from)
    config = model.ModelConfig.from_dict(source_meta["model_config"]) if source_meta.get("model_config") else None
    options = PreprocessOptions.from_dict(source_meta["preprocess"])
    _, height, width, _ = source_model.input_shape  # the network's own, whatever a converted file's metadata says
    options = dataclasses.replace(options, canvas=dataclasses.replace(options.canvas, height=height, width=width))
    return source_model, source_meta, config, options


def start_from(source_model, source_meta, charset, config=None, options=None):
    """`source_model`'s network with `charset`'s output classes and every weight carried over (the output
    rows by symbol). `config`: its settings (None: as the source is, on the source's canvas); `options`: this
    run's pixels, whose canvas the new network reads (None: the source's). Returns (model, the symbols that start
    fresh)."""
    source_options = PreprocessOptions.from_dict(source_meta.get("preprocess", {}))
    canvas = (options or source_options).canvas
    crnn = (model.build_model(config, charset.num_classes, canvas) if config is not None
            else model.with_output_classes(source_model, charset.num_classes))
    return crnn, copy_weights_by_symbol(source_model, Charset.from_dict(source_meta["charset"]), crnn, charset,
                                        (source_options.canvas.colours, canvas.colours))


def output_class_sources(source_charset, target_charset):
    """For each output class of the target charset, the class of the source charset that reads the
    same symbol (the blank maps to the blank), or None for a symbol the source never learned."""
    sources = [None] * target_charset.num_classes
    sources[target_charset.blank_index] = source_charset.blank_index
    for symbol in target_charset.symbols:
        if symbol in source_charset.symbols:
            sources[target_charset.encode(symbol)[0]] = source_charset.encode(symbol)[0]
    return sources


def copy_weights_by_symbol(source, source_charset, target, target_charset, colours=((), ())):
    """Copy every weight of `source` into the same-shaped `target`, layer by layer in order; the
    output layer's rows are carried over by symbol, so a symbol keeps what it learned whatever its
    position in the new charset; the first convolution's input channels by first_kernel_for_channels, and the
    asked colours' shifts by asked_colour_kernel, `colours` being (the source's asked colours, the target's).
    Returns the symbols that start fresh."""
    source_layers = [layer for layer in source.layers if layer.weights and layer.name not in model.ASKED_COLOUR_LAYERS]
    target_layers = [layer for layer in target.layers if layer.weights and layer.name not in model.ASKED_COLOUR_LAYERS]
    if len(source_layers) != len(target_layers):
        raise CaptchaError(f"--init_from model has {len(source_layers)} layers with weights, this one "
                           f"{len(target_layers)}: not the same architecture")
    first_release_planes = 0 if takes_asked_colour(source) else len(colours[0])
    for src, dst in zip(source_layers[:-1], target_layers[:-1]):
        weights = src.get_weights()
        if src is source_layers[0]:  # gray to colour or back; a first release's asked-colour planes left out
            if first_release_planes:
                weights = [weights[0][:, :, :-first_release_planes], *weights[1:]]
            weights = first_kernel_for_channels(weights, [tuple(dst.weights[0].shape)])
        if [w.shape for w in weights] != [tuple(w.shape) for w in dst.weights]:
            raise CaptchaError(f"--init_from layer {src.name} has weights of shapes {[w.shape for w in weights]}, "
                               f"this model's {dst.name} {[tuple(w.shape) for w in dst.weights]}")
        dst.set_weights(weights)
    for name in model.ASKED_COLOUR_LAYERS if colours[1] else ():
        target.get_layer(name).set_weights([asked_colour_kernel(source, target, *colours, name)])
    (src_kernel, src_bias), (kernel, bias) = source_layers[-1].get_weights(), target_layers[-1].get_weights()
    sources = output_class_sources(source_charset, target_charset)
    for target_class, source_class in enumerate(sources):
        if source_class is not None:  # kernel (features, classes), bias (classes,)
            kernel[:, target_class], bias[target_class] = src_kernel[:, source_class], src_bias[source_class]
    target_layers[-1].set_weights([kernel, bias])
    return "".join(s for s in target_charset.symbols if sources[target_charset.encode(s)[0]] is None)


def asked_colour_kernel(source, target, source_colours, target_colours, name=model.ASKED_COLOUR):
    """The kernel (colours, shifted values) of the target's asked-colour layer `name` (model.ASKED_COLOUR_LAYERS):
    each colour's shift carried by its name where the start model knew it (of the image, gray to colour: the same
    shift on each channel; back: their mean), else zero, so the new model starts reading every image exactly as the
    start model does and learns from there what each asked colour changes. (A first-release model convolved
    constant planes instead, and this release's first models had no feature shift; nothing carries.)"""
    kernel = np.zeros(tuple(target.get_layer(name).weights[0].shape), np.float32)
    if source_colours and has_layer(source, name):
        known = source.get_layer(name).get_weights()[0]  # (colours, channels or features)
        if known.shape[1] != kernel.shape[1]:
            known = np.repeat(known.mean(axis=1, keepdims=True), kernel.shape[1], axis=1)
        for row, colour in enumerate(target_colours):
            if colour in source_colours:
                kernel[row] = known[source_colours.index(colour)]
    return kernel


def takes_asked_colour(crnn):
    """Whether `crnn` turns the asked colour into a shift of the image (model.build_model), not convolved planes."""
    return has_layer(crnn, model.ASKED_COLOUR)


def has_layer(crnn, name):
    return any(layer.name == name for layer in crnn.layers)


def first_kernel_for_channels(weights, target_shapes):
    """The first convolution's kernel for the other input channels. Gray (3, 3, 1, F) to colour: spread over the
    three channels, a third on each; colour (3, 3, 3, F) to gray: the three summed. Either way the new model
    computes on a gray image exactly what the old one did on that image given as three equal channels."""
    kernel, *rest = weights
    if kernel.ndim == 4 and kernel.shape[2] == 1 and tuple(target_shapes[0])[2] == 3:
        kernel = np.repeat(kernel / 3.0, 3, axis=2)
    elif kernel.ndim == 4 and kernel.shape[2] == 3 and tuple(target_shapes[0])[2] == 1:
        kernel = kernel.sum(axis=2, keepdims=True)
    return [kernel, *rest]


def cnn_frozen(crnn):
    return any(not layer.trainable for layer in crnn.layers if isinstance(layer, keras.layers.Conv2D))


def set_cnn_trainable(crnn, trainable):
    """Freeze or thaw the convolution blocks (frozen BatchNorm also keeps its statistics)."""
    for layer in crnn.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization)):
            layer.trainable = trainable


@dataclass(frozen=True)
class NetworkFlags:
    """The flags that decide a run's network and pixels (train.py's of the same names: cli.section)."""

    preset: str = "auto"
    init_from: str = "base"
    recipe: str = "default"  # the base model starts only runs of its own recipe
    height: int = 0  # the canvas (0: the network's or the start model's)
    width: int = 0
    channels: int = 0  # 0: as the scan decided
    auto_crop: bool = False
    force_invert: bool = False
    strong: bool = False


@dataclass
class Network:
    """Phase 2's result: the network's settings, the pixels it reads, and where its weights start."""

    config: model.ModelConfig | None  # None: a start model that stores no settings (a converted reference one)
    options: preprocess.PreprocessOptions
    steps: int  # CTC time steps
    init_from: Path | None = None
    start: tuple | None = None  # (start model, its metadata)


def resolve_network(flags, recipe, scan, max_len, colours=()):
    """The network and its pixels (NetworkFlags): a preset's, or those of the model it starts from, with this run's
    canvas; `colours`: those the images ask for, each a plane of the input beside the image's channels."""
    preset = "fast" if flags.preset == "auto" else flags.preset  # on a GPU too: the network measured on real captchas
    if preset not in model.PRESETS:
        raise CaptchaError(f"unknown --preset {flags.preset!r}; choose from {sorted(model.PRESETS)} or auto")
    config, start, start_options = model.PRESETS[preset], None, None
    init_from = resolve_init_from(flags.init_from, preset, flags.recipe)
    if init_from:  # fine-tuning keeps the architecture and the pixels it starts from, read from the file itself
        source_model, source_meta, config, start_options = load_start(init_from)
        start = source_model, source_meta
    switches = dict(auto_crop=flags.auto_crop, force_invert=flags.force_invert, strong=flags.strong)
    median_aspect = scan.median_aspect()
    if init_from and config is None:
        if colours:
            raise CaptchaError(f"--init_from {init_from}: its network settings are not stored in it, so it cannot "
                               f"take the asked colour as an input; use --init_from base or none")
        if flags.height or flags.width or flags.channels not in (0, start_options.canvas.channels):
            raise CaptchaError(f"--init_from {init_from}: its network settings are not stored in it, so its canvas "
                               f"and channels cannot change; drop --height, --width and --channels")
        if not flags.channels and scan.channels()[0] not in (None, start_options.canvas.channels):
            print(f"channels: {start_options.canvas.channels}, as {init_from} reads (its network settings are not stored "
                  f"in it, so they cannot change)")
        network = Network(None, dataclasses.replace(start_options, **switches), start[0].output_shape[1], init_from,
                          start)
    else:
        channels = flags.channels or scan.channels()[0] or 1  # --channels 0: as the scan decided
        if colours and channels == 1:
            print("warning: --channels 1 reads gray, though the images are read with the colour they ask for: "
                  "only the strokes' shade can tell the asked ones apart")
        start_canvas = start_options.canvas if init_from else Canvas()  # the start model's, or the default
        canvas = model.fit_canvas(config, dataclasses.replace(start_canvas, channels=channels, colours=tuple(colours)),
                                  height=flags.height, width=flags.width, median_aspect=median_aspect, start_model=init_from)
        options = (dataclasses.replace(start_options, canvas=canvas, **switches) if init_from
                   else recipe.preprocess_options(canvas, **switches))
        network = Network(config, options, model.time_steps(config, canvas), init_from, start)
    model.check_time_steps(network.steps, max_len, network.options.canvas, median_aspect)
    return network


def fit_in_phases(crnn, train_batches, run_callbacks, *, first_epoch, frozen_until, epochs, compile_for):
    """fit() with the convolutions frozen until epoch `frozen_until` (fine-tuning with --freeze_cnn_epochs),
    then thawed, with a fresh optimizer and schedule for every weight. Returns the epochs trained."""
    verbose = 1 if sys.stdout.isatty() else 2  # progress bars on terminals only
    # shuffle=False: the loader shuffles itself from (seed, epoch); fit()'s own shuffle of the batch order draws
    # from Python's global random state, which a resumed run would not have
    fit = dict(callbacks=run_callbacks.all, verbose=verbose, shuffle=False)
    trained = 0
    if first_epoch < frozen_until:
        print(f"epochs {first_epoch + 1}-{frozen_until}: convolutions frozen")
        history = crnn.fit(train_batches, epochs=frozen_until, initial_epoch=first_epoch, **fit)
        trained = len(history.history.get("loss", []))
        first_epoch += trained
        run_callbacks.log.append = True  # the thawed epochs add to the frozen ones' rows
        if first_epoch < frozen_until:  # stopped early (settled, or EarlyStopping): nothing thawed
            return trained
    if first_epoch == frozen_until and cnn_frozen(crnn):  # made at the boundary only, so a resume later
        set_cnn_trainable(crnn, True)  # keeps the thawed epochs' optimizer state
        compile_for(first_epoch, epochs)
    history = crnn.fit(train_batches, epochs=epochs, initial_epoch=first_epoch, **fit)
    return trained + len(history.history.get("loss", []))
