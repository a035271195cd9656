"""Turn a checkpoint whose height collapse is a `Lambda` layer into one with the registered
`CollapseHeight` layer, which loads in Keras' safe mode and across Keras versions; or export a
model for deployment (--format onnx / tflite / savedmodel).

    python export_safe.py --in_keras saved_model/crnn_ctc_final.keras --out_keras saved_model/crnn_ctc_final_safe.keras
    python export_safe.py --in_keras saved_model/crnn_ctc_best.keras --out_keras saved_model/crnn_ctc_best.onnx --format onnx
    python export_safe.py --in_keras saved_model/crnn_ctc_best.keras --out_keras saved_model/crnn_ctc_best_int8.onnx --format onnx_int8
    python export_safe.py --in_keras saved_model/crnn_ctc_best.keras --out_keras saved_model/crnn_ctc_best.tflite --format tflite

No code stored in the input runs: its architecture is read as JSON, the Lambda's entry is
replaced by CollapseHeight, the model is rebuilt from that in safe mode, and only the weights are
read from the archive. Then the result is saved, reloaded in safe mode, and both must agree on a
batch. With --trust_input (only for files you trust: it runs the Lambda's stored code), the
original model is loaded too and the two must agree.
"""

import sys

import cli
import precheck

if __name__ == "__main__":  # a missing checkpoint is refused before TensorFlow loads
    precheck.exit_on_bad_input(precheck.files_exist, "--in_keras", "model file")

import argparse
import copy
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import h5py
import quiet  # noqa: F401  (first: TensorFlow's start-up lines off; quiet.py)
import keras
import numpy as np

import model
import modelmeta
import charsets
import preprocess
import reader
from charsets import Charset
from errors import CaptchaError

PARITY_TOLERANCE = 1e-5
ONNX_TOLERANCE = 1e-4  # other runtimes (ONNX, TFLite, SavedModel) order float sums otherwise


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in_keras", required=True, help="checkpoint with a Lambda height collapse")
    parser.add_argument("--out_keras", required=True, help="where to write the safe checkpoint")
    parser.add_argument("--collapse", choices=["auto", "mean", "flatten"], default="auto",
                        help="what the Lambda computed: mean over height, or height folded into features "
                             "(auto: the one the weights fit, mean first)")
    parser.add_argument("--charset", default="default",
                        help="symbols of a checkpoint saved without metadata (preset name or the symbols)")
    parser.add_argument("--blank", choices=["first", "last"], default="last",
                        help="CTC blank position of a checkpoint saved without metadata "
                             "(the reference's checkpoints: last)")
    parser.add_argument("--format", choices=sorted(WRITERS), default="keras",
                        help="keras: a safe .keras file; onnx: the network for onnxruntime (test.py reads it); "
                             "onnx_int8: the same with int8 weights (smaller, faster on CPU; check its accuracy); "
                             "tflite: the network for the TFLite interpreter, metadata in OUT.json (test.py reads it); "
                             "savedmodel: a TensorFlow SavedModel folder")
    parser.add_argument("--trust_input", action="store_true",
                        help="also load the input as-is (runs its stored Lambda code) and compare outputs")
    return parser.parse_args(argv)


def read_config(path):
    raw = modelmeta.read_archive_member(path, "config.json")
    if raw is None:
        raise CaptchaError(f"{path}: not a Keras .keras archive (no config.json)")
    return json.loads(raw)


def replace_lambda(config, mode):
    """A copy of the archive's model config with its one Lambda turned into CollapseHeight(mode)."""
    config = copy.deepcopy(config)
    config.pop("compile_config", None)  # the loss may be a custom object; inference needs none
    layers = config["config"]["layers"]
    lambdas = [layer for layer in layers if layer.get("class_name") == "Lambda"]
    if len(lambdas) != 1:
        raise CaptchaError(f"expected one Lambda layer (the height collapse), found {len(lambdas)}")
    old = lambdas[0]
    new = keras.saving.serialize_keras_object(model.CollapseHeight(mode, name=old["config"]["name"]))
    new["name"] = old.get("name", old["config"]["name"])
    # Same input tensors; the Lambda's call kwargs (mask=None) mean nothing to CollapseHeight.
    new["inbound_nodes"] = [{**node, "kwargs": {}} for node in old["inbound_nodes"]]
    if "build_config" in old:
        new["build_config"] = old["build_config"]
    layers[layers.index(old)] = new
    return config


def weight_arrays(h5_path):
    arrays = []
    with h5py.File(h5_path, "r") as f:
        f.visititems(lambda name, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def rebuild(config, weights_file, mode):
    """The model of `config` with CollapseHeight(mode), and every weight of the archive loaded into it."""
    safe_config = replace_lambda(config, mode)
    rebuilt = keras.saving.deserialize_keras_object(safe_config, safe_mode=True)
    rebuilt.load_weights(weights_file)
    stored = sorted(a.size for a in weight_arrays(weights_file))
    loaded = sorted(int(np.prod(w.shape)) for w in rebuilt.weights)
    if stored != loaded:
        raise ValueError(f"{len(stored)} stored weight arrays do not match the model's {len(loaded)}")
    rebuilt.predict_on_batch(parity_batch(rebuilt, count=1))  # weights of the wrong shape fail only here
    return rebuilt


def parity_batch(crnn, count=8, seed=0):
    """Inputs to compare models on: random pixels in [0, 1], the range the pipeline produces."""
    height, width, channels = crnn.input_shape[1:]
    return np.random.default_rng(seed).random((count, height, width, channels), dtype=np.float32)


def rebuild_safely(src, config, args):
    """The Lambda checkpoint `src` rebuilt with CollapseHeight, and its metadata. No code from it runs
    unless --trust_input."""
    with tempfile.TemporaryDirectory() as tmp:
        weights_file = Path(tmp) / "model.weights.h5"  # our own name: archive member names never become paths
        raw = modelmeta.read_archive_member(src, "model.weights.h5")
        if raw is None:
            raise CaptchaError(f"{src}: the archive holds no model.weights.h5")
        weights_file.write_bytes(raw)
        modes = ["mean", "flatten"] if args.collapse == "auto" else [args.collapse]
        errors = []
        for mode in modes:
            try:
                rebuilt = rebuild(config, weights_file, mode)
                break
            except CaptchaError:
                raise
            except Exception as e:  # Keras raises several types when weights don't fit a config
                errors.append(f"collapse={mode}: {type(e).__name__}: {str(e).splitlines()[0]}")
        else:
            raise CaptchaError(f"{src}: not a CRNN this tool can rebuild ({'; '.join(errors)})")
    print(f"rebuilt {src} with CollapseHeight(mode={mode!r}) and {len(rebuilt.weights)} weight arrays")

    meta = modelmeta.read_meta(src)
    if meta is None:
        charset = charsets.charset_from_arg(args.charset, args.blank)
        if rebuilt.output_shape[-1] != charset.num_classes:
            raise CaptchaError(f"{src}: model has {rebuilt.output_shape[-1]} output classes but --charset gives "
                               f"{charset.num_classes} (symbols + blank)")
        height, width, channels = rebuilt.input_shape[1:]
        # and trained on the reference's pixels: no crop, its resize arithmetic, mean padding
        options = dataclasses.replace(preprocess.REFERENCE_PREPROCESSING,
                                      canvas=preprocess.Canvas(height, width, channels))
        meta = modelmeta.make_meta(charset, 5, options, None)
        print(f"{src} has no metadata: assuming {len(charset.symbols)} symbols, blank {args.blank} "
              f"(class {charset.blank_index})")

    if args.trust_input:
        batch = parity_batch(rebuilt)
        original = keras.saving.load_model(src, compile=False, safe_mode=False)
        diff = float(np.max(np.abs(original.predict_on_batch(batch) - rebuilt.predict_on_batch(batch))))
        if diff > PARITY_TOLERANCE:
            raise CaptchaError(f"{src}: the rebuilt model differs from the original by {diff:.2e}: "
                               f"try --collapse flatten or mean")
        print(f"parity with the original (trusted) model: max abs difference {diff:.2e}")
    return rebuilt, meta


def write_keras(crnn, meta, dst):
    model.save_model(crnn, dst, meta)
    reloaded, _ = model.load_model(dst, safe_mode=True)
    return reloaded.predict_on_batch


def save_onnx(crnn, meta, dst):
    """The network alone as an .onnx file (the CTC decoding stays outside: reader.decode), metadata inside."""
    import onnx

    tmp = dst.with_name(f".{dst.name}.tmp")
    with warnings.catch_warnings():  # tf2onnx probes the removed np.object; harmless, but noisy
        warnings.simplefilter("ignore", FutureWarning)
        crnn.export(str(tmp), format="onnx", verbose=False)
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = modelmeta.META_MEMBER, json.dumps(meta)
    onnx.save(proto, str(tmp))
    os.replace(tmp, dst)


def write_onnx(crnn, meta, dst):
    save_onnx(crnn, meta, dst)
    network, _ = reader.load(dst)
    return network.predict_on_batch


def quantize_onnx(crnn, meta, dst):
    """The ONNX network with int8 weights in its LSTMs and dense layers, which hold 9 in 10 of the weights
    (dynamic quantization: activations are quantized as it runs, so no calibration images are needed;
    the float model's metadata comes along). The convolutions stay float: onnxruntime's int8 convolution
    (ConvInteger) read 6 times slower here."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path = dst.with_name(f".{dst.stem}.float.onnx")
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        save_onnx(crnn, meta, float_path)
        quantize_dynamic(str(float_path), str(tmp), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm", "LSTM"])
        os.replace(tmp, dst)
    finally:
        float_path.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    network, _ = reader.load(dst)  # refuses a file without the metadata
    return network.predict_on_batch


def write_savedmodel(crnn, meta, dst):
    """A TensorFlow SavedModel folder (endpoint `serve`), with captcha_meta.json beside its files."""
    import tensorflow as tf

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    crnn.export(str(tmp), format="tf_saved_model", verbose=False)
    (tmp / modelmeta.META_MEMBER).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    served = tf.saved_model.load(str(dst))
    return lambda batch: served.serve(batch).numpy()


def unrolled_copy(crnn):
    """The same network with its LSTMs unrolled over the fixed time steps: TFLite then runs them as its
    own built-in ops (a rolled LSTM converts only to TensorFlow 'select' ops, which the standard
    interpreter lacks)."""

    def unroll(config):
        for key, value in config.items():
            if key == "unroll":
                config[key] = True
            elif isinstance(value, dict):
                unroll(value)
        return config

    unrolled = keras.models.clone_model(crnn, clone_function=lambda layer: layer.__class__.from_config(
        unroll(layer.get_config())))  # only recurrent layers have an "unroll" setting
    unrolled.set_weights(crnn.get_weights())
    return unrolled


def write_tflite(crnn, meta, dst):
    """A .tflite file of the network (unrolled), with the metadata beside it as DST.json."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        unrolled_copy(crnn).export(tmp, format="tf_saved_model", verbose=False)
        flatbuffer = tf.lite.TFLiteConverter.from_saved_model(tmp).convert()
    tmp_file = dst.with_name(f".{dst.name}.tmp")
    tmp_file.write_bytes(flatbuffer)
    modelmeta.tflite_meta_path(dst).write_text(json.dumps(meta, indent=2))
    os.replace(tmp_file, dst)
    network, _ = reader.load(dst)
    return network.predict_on_batch


WRITERS = {"keras": write_keras, "onnx": write_onnx, "onnx_int8": quantize_onnx, "savedmodel": write_savedmodel,
           "tflite": write_tflite}
# int8 weights move probabilities by design: on the parity batch (noise, where the model is unsure) a few time steps
# flip their likeliest symbol. So int8 is held to the average difference and to the share of time steps whose
# likeliest symbol is unchanged; a broken export misses both by far.
INT8_MEAN_TOLERANCE = 0.01
INT8_AGREEMENT = 0.9


def export(args):
    src, dst = Path(args.in_keras), Path(args.out_keras)
    if dst.exists() and dst.resolve() == src.resolve():
        raise CaptchaError(f"{dst}: --out_keras would overwrite --in_keras; choose another path")
    config = read_config(src)
    if modelmeta.lambda_layer_names(src):
        crnn, meta = rebuild_safely(src, config, args)
    elif args.format == "keras" and modelmeta.read_meta(src) is None:
        raise CaptchaError(f"{src}: already has no Lambda layer, but no metadata either; nothing to export")
    else:  # a safe model already: written again as the network and its metadata, without optimizer state
        crnn, meta = model.load_model(src)
        print(f"{src} has no Lambda layer: it already loads in safe mode")

    batch = parity_batch(crnn)
    expected = crnn.predict_on_batch(batch)
    dst.parent.mkdir(parents=True, exist_ok=True)
    predict = WRITERS[args.format](crnn, meta, dst)
    got = predict(batch)
    diff = float(np.max(np.abs(got - expected)))
    # Other runtimes order float sums differently; int8 is measured by its accuracy (test.py on a test split).
    if args.format == "onnx_int8":
        mean, agreement = float(np.mean(np.abs(got - expected))), float(np.mean(got.argmax(-1) == expected.argmax(-1)))
        failed = mean > INT8_MEAN_TOLERANCE or agreement < INT8_AGREEMENT
        print(f"int8 against the model: mean abs difference {mean:.2e} (at most {INT8_MEAN_TOLERANCE:g}), likeliest "
              f"symbol unchanged at {agreement:.1%} of time steps (at least {INT8_AGREEMENT:.0%})")
    else:
        failed = diff > {"keras": PARITY_TOLERANCE}.get(args.format, ONNX_TOLERANCE)
    if failed:
        if dst.is_dir():
            shutil.rmtree(dst)
        else:
            dst.unlink()
        if args.format == "tflite":  # its metadata file beside it goes too
            modelmeta.tflite_meta_path(dst).unlink()
        raise CaptchaError(f"{dst}: the {args.format} export differs from the model by {diff:.2e}; removed it")
    charset = Charset.from_dict(meta["charset"])
    print(f"wrote {dst} ({args.format}): max abs difference from the Keras model {diff:.2e} on a batch of "
          f"{len(batch)}; decodes with blank at class {charset.blank_index}"
          + ("; loads with safe_mode=True" if args.format == "keras" else ""))
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return export(args)
    except CaptchaError as e:
        return cli.user_error(e)


if __name__ == "__main__":
    sys.exit(main())
