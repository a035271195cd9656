"""The CRNN: convolutions -> CollapseHeight -> 2x bidirectional LSTM -> per-time-step softmax, trained with CTC.

One builder serves every script. Written with `keras.ops` only, so it runs on any Keras backend
(TensorFlow by default; `KERAS_BACKEND=jax` on machines without TensorFlow).

A trained model is one `.keras` file: Keras' own archive plus a `captcha_meta.json` member that
holds the charset, the blank index, the label length and the preprocessing options, so test.py
never needs them typed again.
"""

import json
import math
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import quiet  # noqa: F401  (first: TensorFlow's start-up lines off; quiet.py)
import keras
from keras import layers, ops

from modelmeta import META_MEMBER, lambda_layer_names, read_meta, reference_meta
from charsets import PAD_LABEL, Charset
from errors import CaptchaError
from preprocess import Canvas


@dataclass(frozen=True)
class ModelConfig:
    """The network's settings; its input is a preprocess.Canvas, given to build_model beside them."""

    conv_filters: tuple = (64, 128, 256)
    pools: tuple = ((2, 2), (2, 2), (2, 1))  # (height, width) pooling after each convolution block
    convs_per_block: int = 1  # 3x3 convolutions before each pooling
    batch_norm: bool = True  # Conv (no bias) -> BatchNorm -> ReLU; False: Conv (bias, relu)
    conv_init: str = "glorot_uniform"  # the convolutions' kernel initializer (Keras' default)
    block_dropout: float = 0.0  # dropout after each block's pooling
    extra_conv: int = 0  # filters of one more Conv2D(3x3, bias, relu) before the collapse; 0: none
    collapse: str = "mean"  # how CollapseHeight turns (H, W, C) into W time steps: "mean" or "flatten"
    project_units: int = 0  # a Dense(relu) on each time step's features after the collapse; 0: none
    dropout_cnn: float = 0.25  # after the collapse (and projection)
    lstm_units: tuple = (256, 256)  # one bidirectional LSTM per entry
    lstm_dropout: float = 0.0  # dropout on each LSTM's inputs (Keras' LSTM(dropout=...))
    dropout_rnn: float = 0.15  # between the recurrent layers
    bn_momentum: float = 0.99  # Keras' default; 0.9 lets inference statistics catch up in short runs

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        # files written before the canvas left the network's settings hold height, width and channels: the canvas
        # is read from their preprocessing, so these are dropped here
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ or k == "lstm_layers"}
        if "lstm_layers" in d:  # files written before lstm_units became a tuple: units, layers
            d["lstm_units"] = (d["lstm_units"],) * d.pop("lstm_layers")
        if "conv_filters" in d:
            d["conv_filters"] = tuple(d["conv_filters"])
        if "pools" in d:
            d["pools"] = tuple(tuple(p) for p in d["pools"])
        if "lstm_units" in d:
            d["lstm_units"] = tuple(d["lstm_units"])
        return cls(**d)


MAX_AUTO_WIDTH = 800  # with the width unset, the canvas widens for wide captchas up to this

PRESETS = {
    # The reference's network, exactly (4,394,879 parameters for 62 symbols): three blocks of two
    # Conv(no bias)-BatchNorm-ReLU, max-pool and Dropout(0.25); Conv2D(256, bias, relu); the mean over
    # height; two BiLSTM(256, dropout 0.15); softmax. 50 time steps.
    "seed": ModelConfig(convs_per_block=2, block_dropout=0.25, extra_conv=256, dropout_cnn=0.0, lstm_dropout=0.15,
                        dropout_rnn=0.0),
    # For CPUs, and the one that reads real captchas from a few hundred images: a quarter of the
    # seed's convolution work; 50 time steps like the seed's (with 25, real captchas lost one of two
    # equal letters side by side, "dppyz" read "dpyz": CTC needs a blank step between them); the 6
    # remaining rows folded into the features (then projected to 128) instead of averaged, so the
    # LSTMs still see where in the column the strokes are.
    "fast": ModelConfig(conv_filters=(32, 64, 128), pools=((2, 2), (2, 2), (2, 1)), collapse="flatten",
                        project_units=128, lstm_units=(128, 128), bn_momentum=0.9),
    # The keras-io "OCR model for reading Captchas" example's network, as a benchmark contender:
    # Conv32-pool-Conv64-pool without BatchNorm (He-normal kernels), height folded into Dense(64), BiLSTM 128 then 64.
    "kerasio": ModelConfig(conv_filters=(32, 64), pools=((2, 2), (2, 2)), batch_norm=False, conv_init="he_normal",
                           collapse="flatten",
                           project_units=64, dropout_cnn=0.2, lstm_units=(128, 64), lstm_dropout=0.25,
                           dropout_rnn=0.0),
    # For the tests' committed reader (tests/fixtures/make_reader.py): learns plain digits from scratch in a few
    # CPU minutes, and its file stays well under 1 MB.
    "small": ModelConfig(conv_filters=(16, 32, 48), pools=((2, 2), (2, 2), (2, 1)), collapse="flatten", project_units=64,
                         lstm_units=(64,), dropout_cnn=0.0, dropout_rnn=0.0, bn_momentum=0.9),
    # For tests: trains in seconds.
    "tiny": ModelConfig(conv_filters=(8, 16, 16), lstm_units=(16,), dropout_cnn=0.0, dropout_rnn=0.0,
                        bn_momentum=0.9),
}


def time_steps(config, canvas=Canvas()):
    """Output sequence length: the canvas's width after the network's poolings."""
    return canvas.width // width_stride(config)


def fit_canvas(config, canvas, *, height=0, width=0, median_aspect=None, start_model=None):
    """`canvas` (the network's default, or the start model's, with this run's channels and colours) with the run's
    --height and --width (0: as it is). With the width unset the canvas widens for a folder whose median image is
    wider than it, so that the text keeps every row; the width is a whole number of `config`'s time steps."""
    stride = width_stride(config)
    fixed_width = width
    height, width = height or canvas.height, width or canvas.width
    if not fixed_width and median_aspect and height * median_aspect > width:
        width = min(MAX_AUTO_WIDTH, math.ceil(height * median_aspect / stride) * stride)
        print(f"canvas: {width}x{height}, widened for the folder's median image ({median_aspect:.2f}:1, wider than "
              f"{canvas.width}x{canvas.height}); set it with --width")
    if width % stride or height < 8:
        raise CaptchaError(f"--width {width} --height {height}: the width must be a multiple of {stride} (input "
                           f"columns per time step) and the height at least 8")
    if start_model and config.collapse == "flatten" and height != canvas.height:
        raise CaptchaError(f"--height {height}: the start model {start_model} reads {canvas.height}-row images (its "
                           f"layers after the convolutions depend on the height); use --height {canvas.height}, "
                           f"or --init_from none")
    return replace(canvas, height=height, width=width)


def check_time_steps(steps, max_len, canvas=None, median_aspect=None):
    """CTC needs at least one output step per character (and one more between each repeated pair). The
    steps counted are those the text spans: an image narrower than the canvas is padded at its sides."""
    spanned = steps
    if median_aspect and canvas:
        spanned = math.floor(steps * min(1.0, canvas.height * median_aspect / canvas.width))
    where = f" (the folder's median image fills {spanned} of the {steps} time steps)" if spanned < steps else ""
    if spanned < max_len:
        raise CaptchaError(f"the text spans {spanned} time steps{where} but labels have up to {max_len} characters; "
                           f"use a larger canvas (--width, and --height with --init_from none) or shorter labels")
    if spanned < 2 * max_len - 1:
        print(f"warning: the text spans {spanned} time steps{where} for labels of {max_len}: labels with many "
              f"repeated characters may be unlearnable; a wider --width gives more")


def width_stride(config):
    """Input columns per output time step (the product of the poolings' widths)."""
    stride = 1
    for _, pool_width in config.pools:
        stride *= pool_width
    return stride


@keras.saving.register_keras_serializable(package="crnn")
class CollapseHeight(layers.Layer):
    """(batch, H, W, C) -> (batch, W, C') so that image columns become CTC time steps.

    A registered layer, unlike the reference's `Lambda`, loads in Keras' safe mode and in other
    Keras versions: its code lives here, not as pickled bytecode in the checkpoint.
    """

    def __init__(self, mode="mean", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("mean", "flatten"):
            raise ValueError(f"CollapseHeight mode must be 'mean' or 'flatten', got {mode!r}")
        self.mode = mode

    def call(self, x):
        if self.mode == "mean":
            return ops.mean(x, axis=1)
        x = ops.transpose(x, (0, 2, 1, 3))  # (batch, W, H, C)
        return ops.reshape(x, (-1, x.shape[1], x.shape[2] * x.shape[3]))

    def compute_output_shape(self, input_shape):
        batch, h, w, c = input_shape
        return (batch, w, c if self.mode == "mean" else h * c)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


ASKED_COLOUR = "asked_colour"  # the Dense layer that turns the asked colour into a shift of the image's colours
ASKED_COLOUR_FEATURES = "asked_colour_features"  # ... and the one that turns it into a shift of the column features
ASKED_COLOUR_LAYERS = (ASKED_COLOUR, ASKED_COLOUR_FEATURES)


@keras.saving.register_keras_serializable(package="crnn")
class SplitAskedColour(layers.Layer):
    """(batch, H, W, C + K) -> [(batch, H, W, C), (batch, K)]: the image's channels, and the asked colour read from
    one pixel of the K constant planes that follow them (preprocess.with_asked_colour)."""

    def __init__(self, image_channels, **kwargs):
        super().__init__(**kwargs)
        self.image_channels = image_channels

    def call(self, x):
        return x[..., :self.image_channels], x[:, 0, 0, self.image_channels:]

    def compute_output_shape(self, input_shape):
        batch, h, w, c = input_shape
        return [(batch, h, w, self.image_channels), (batch, c - self.image_channels)]

    def get_config(self):
        return {**super().get_config(), "image_channels": self.image_channels}


def build_model(config, num_classes, canvas=Canvas(), legacy_lambda=False):
    """The CRNN of `config` reading `canvas` (preprocess.Canvas: its shape is the input's), ending in a softmax
    over `num_classes` (symbols + blank) at each time step.

    legacy_lambda=True collapses height with a `Lambda` instead of CollapseHeight, as the
    reference's checkpoints do: export_safe.py's tests build those with it.
    """
    image = keras.Input(shape=canvas.shape, name="image")  # (batch, 50, 200, 1), or (batch, 50, 200, 3 + colours)
    x = image
    if canvas.colours:
        # The asked colour shifts the image's colours by a vector learned for it (zero at first: a start model reads
        # as it did), so a filter tuned to one ink rises or falls with it from the first convolution on, for one
        # addition a pixel; convolving the constant planes themselves cost that convolution several times its work.
        x, asked = SplitAskedColour(canvas.channels, name="split_asked_colour")(image)  # (b, H, W, C), (b, K)
        shift = layers.Dense(canvas.channels, use_bias=False, kernel_initializer="zeros", name=ASKED_COLOUR)(asked)
        x = layers.Add()([x, layers.Reshape((1, 1, canvas.channels))(shift)])  # (b, H, W, C) + (b, 1, 1, C)
    # The seed pools (2, 2), (2, 2), then height only, so 200 columns become 50 time steps.
    for filters, pool in zip(config.conv_filters, config.pools):
        for _ in range(config.convs_per_block):
            if config.batch_norm:
                x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=config.conv_init)(x)
                x = layers.BatchNormalization(momentum=config.bn_momentum)(x)
                x = layers.Activation("relu")(x)
            else:
                x = layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_initializer=config.conv_init)(x)
        x = layers.MaxPooling2D(pool)(x)
        if config.block_dropout:
            x = layers.Dropout(config.block_dropout)(x)
    if config.extra_conv:
        x = layers.Conv2D(config.extra_conv, 3, padding="same", activation="relu")(x)
    # (batch, H, W, C), e.g. (batch, 6, 50, 128) -> (batch, W, C) or (batch, W, H * C)
    if legacy_lambda:  # self-contained lambdas: Keras stores them as bytecode without their module
        if config.collapse == "mean":
            collapse = lambda t: __import__("keras").ops.mean(t, axis=1)  # noqa: E731
        else:
            collapse = lambda t: __import__("keras").ops.reshape(  # noqa: E731
                __import__("keras").ops.transpose(t, (0, 2, 1, 3)), (-1, t.shape[2], t.shape[1] * t.shape[3]))
        x = layers.Lambda(collapse, name="collapse_height")(x)
    else:
        x = CollapseHeight(config.collapse, name="collapse_height")(x)
    if config.project_units:
        x = layers.Dense(config.project_units, activation="relu", name="project")(x)
    if canvas.colours:
        # The first shift can only move the first convolution's outputs along the image's C directions; this one tells
        # the recurrent layers which colour to keep in all F directions (zero at first too), for one addition a column.
        features = x.shape[-1]
        feature_shift = layers.Dense(features, use_bias=False, kernel_initializer="zeros",
                                     name=ASKED_COLOUR_FEATURES)(asked)
        x = layers.Add()([x, layers.Reshape((1, features))(feature_shift)])  # (b, W, F) + (b, 1, F)
    if config.dropout_cnn:
        x = layers.Dropout(config.dropout_cnn)(x)
    for i, units in enumerate(config.lstm_units):
        lstm = layers.LSTM(units, return_sequences=True, dropout=config.lstm_dropout)
        x = layers.Bidirectional(lstm, name=f"bilstm_{i + 1}")(x)  # (batch, W, 2 * units)
        if i < len(config.lstm_units) - 1 and config.dropout_rnn:
            x = layers.Dropout(config.dropout_rnn)(x)
    # float32 even under mixed precision: CTC needs the probabilities' full range
    probs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="softmax")(x)  # (batch, W, classes)
    return keras.Model(image, probs, name="crnn_ctc")


def with_output_classes(source, num_classes):
    """A fresh (untrained) model of `source`'s architecture, read from the model itself, with a softmax
    over `num_classes`: fine-tuning starts from any checkpoint, a converted reference one included."""
    clone = keras.models.clone_model(source)
    if clone.output_shape[-1] == num_classes:
        return clone
    features = clone.layers[-2].output  # (batch, W, features) before the output layer
    probs = layers.Dense(num_classes, activation="softmax", dtype="float32", name=clone.layers[-1].name)(features)
    return keras.Model(clone.inputs, probs, name=source.name)


@keras.saving.register_keras_serializable(package="crnn")
class CTCLoss(keras.losses.Loss):
    """CTC on the model's softmax output, with the blank where this model keeps it.

    Labels come padded with PAD_LABEL; their lengths are counted from that. keras.losses.CTC
    hard-codes the blank at 0, which would misread blank-last (reference) models.
    """

    def __init__(self, blank_index=0, name="ctc", **kwargs):
        super().__init__(name=name, **kwargs)
        self.blank_index = blank_index

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "int32")
        label_length = ops.sum(ops.cast(ops.not_equal(y_true, PAD_LABEL), "int32"), axis=-1)
        targets = ops.where(ops.equal(y_true, PAD_LABEL), 0, y_true)  # padding: any valid index
        y_pred = ops.cast(y_pred, "float32")
        batch, steps = ops.shape(y_pred)[0], ops.shape(y_pred)[1]
        output_length = ops.full((batch,), steps, dtype="int32")
        # ctc_loss expects logits; log-probabilities are logits whose log-softmax is themselves.
        log_probs = ops.log(ops.clip(y_pred, 1e-8, 1.0))
        return ops.ctc_loss(targets, log_probs, label_length, output_length, mask_index=self.blank_index)

    def get_config(self):
        return {**super().get_config(), "blank_index": self.blank_index}


# ----------------------------------------------------------------------------- model files


def save_model(model, path, meta):
    """Write `model` plus its metadata atomically: a crash mid-save never leaves a broken file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".keras", prefix=f".{path.stem}-", dir=path.parent)
    os.close(fd)
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(META_MEMBER, json.dumps(meta, indent=2))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def update_meta(path, changes):
    """Rewrite the metadata of the .keras file at `path` with `changes` merged in; the weights stay as they are
    (copied byte for byte), and a crash mid-write leaves the old file."""
    return copy_with_meta(path, path, changes)


def copy_with_meta(path, destination, changes=None):
    """Copy the .keras file at `path` to `destination` with `changes` merged into its metadata; the weights are
    copied byte for byte, and a crash mid-write leaves whatever was at `destination` before."""
    path, destination = Path(path), Path(destination)
    meta = {**(read_meta(path) or {}), **(changes or {})}
    fd, tmp = tempfile.mkstemp(suffix=".keras", prefix=f".{destination.stem}-", dir=destination.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for item in source.infolist():
                if item.filename != META_MEMBER:
                    archive.writestr(item, source.read(item.filename))
            archive.writestr(META_MEMBER, json.dumps(meta, indent=2))
        os.replace(tmp, destination)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return meta


def load_model(path, safe_mode=True, compile=False):
    """Load a .keras model and its metadata. Safe mode (no code from the file runs) unless asked.

    compile=True also restores the optimizer and its state (for resuming training).
    """
    path = Path(path)
    if path.suffix.lower() in (".onnx", ".tflite"):
        raise CaptchaError(f"{path}: an exported network, not a .keras model; read it with reader.load")
    meta = read_meta(path)  # also checks the file exists and is an archive
    lambdas = lambda_layer_names(path)
    if lambdas and safe_mode:
        raise CaptchaError(
            f"{path}: holds a Lambda layer ({', '.join(lambdas)}) whose code Keras will not run in safe mode; "
            f"convert it with: python export_safe.py --in_keras {path} --out_keras <new>.keras"
        )
    try:
        model = keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)
    except Exception as e:  # Keras raises ValueError/TypeError/KeyError for archives it can't rebuild
        raise CaptchaError(f"{path}: Keras could not load this model ({type(e).__name__}: {e})") from None
    if meta is None:
        meta = reference_meta(model.output_shape[-1])
    charset = Charset.from_dict(meta["charset"])
    if model.output_shape[-1] != charset.num_classes:
        raise CaptchaError(
            f"{path}: model outputs {model.output_shape[-1]} classes but its charset has "
            f"{charset.num_classes} (symbols + blank)"
        )
    return model, meta


def make_strategy(name, gpu_count):
    """TensorFlow's MirroredStrategy over every GPU (over the logical CPUs when there is no GPU), or None.

    Keras splits each global batch across the replicas and sums their gradients. Multi-machine
    training (MultiWorkerMirroredStrategy) is not offered: Keras 3's fit() fails under it
    (keras-team/keras#20585).
    """
    if name not in ("auto", "mirrored", "none"):
        raise CaptchaError(f"unknown --strategy {name!r}; choose from auto, mirrored, none")
    if name == "none" or (name == "auto" and gpu_count < 2):
        return None
    if keras.backend.backend() != "tensorflow":
        raise CaptchaError(f"--strategy {name} needs the TensorFlow backend (this is {keras.backend.backend()})")
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def gpu_names():
    """The GPUs the active Keras backend will use (empty on a CPU-only machine)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []
