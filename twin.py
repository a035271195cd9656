"""The ONNX twin of a .keras model: the same network, written beside it as NAME.onnx when a run ends, and read in
its place (reader.load) while it is the same model, so that reading a captcha with a .keras file imports neither
Keras nor TensorFlow.

"The same model" is checked, not assumed: the twin stores the SHA-256 of the .keras file it was made from, and a
.keras file changed since (trained again, its metadata rewritten, replaced by another) no longer matches, so its
twin is passed over and the .keras file is read itself. A twin is written only when it reads as the Keras model
does (within TWIN_TOLERANCE), and where it cannot be written (no ONNX converter for this backend)
the run says so in one line and its readers read the .keras file.
"""

import hashlib
from pathlib import Path

SOURCE_KEY = "twin_of_sha256"  # in the twin's metadata: the digest of the .keras file it was made from
# The largest difference of any class probability between the twin and the Keras model on export_safe's parity
# batch. Summation order differs between the runtimes, and a softmax over 1,000 classes (a Chinese alphabet) moves
# by more than export_safe's 1e-4; within this, every time step whose two likeliest classes lie more than twice it
# apart reads the same symbol, and a reading's confidence moves by about it per step.
TWIN_TOLERANCE = 1e-3


def twin_path(keras_path):
    return Path(keras_path).with_suffix(".onnx")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_twin_of(meta, keras_path):
    """Whether an ONNX model's metadata `meta` says it was made from the .keras file at `keras_path` as it is now."""
    return meta.get(SOURCE_KEY) == file_sha256(keras_path)


def write_twin(keras_path):
    """Writes the twin of the .keras file at `keras_path`; returns its path, or None (said in one line) when no
    twin that reads alike could be written. A twin already there that is the same model is kept as it is (a
    self-training run copies its chosen round's); an older one that is not is replaced or removed."""
    import reader

    keras_path, path = Path(keras_path), twin_path(keras_path)
    if path.exists():
        try:
            if is_twin_of(reader.load_onnx(path)[1], keras_path):
                return path
        except reader.CaptchaError:  # unreadable: written anew below
            pass
    import export_safe  # Keras, TensorFlow and the converter: only where a twin is written
    import model

    crnn, meta = model.load_model(keras_path)
    batch = export_safe.parity_batch(crnn)
    expected = crnn.predict_on_batch(batch)  # (a model is exported once it has been called)
    try:
        export_safe.save_onnx(crnn, {**meta, SOURCE_KEY: file_sha256(keras_path)}, path)
        network, _ = reader.load(path)
        difference = float(abs(network.predict_on_batch(batch) - expected).max())
    except Exception as e:  # the converters raise their own types (no tf2onnx under JAX, an unsupported op, ...)
        path.unlink(missing_ok=True)
        print(f"no ONNX twin for {keras_path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"readers read the .keras file")
        return None
    if difference > TWIN_TOLERANCE:
        path.unlink()
        print(f"no ONNX twin for {keras_path}: it read {difference:.2e} away from the Keras model; readers read the "
              f".keras file")
        return None
    print(f"wrote {path}, the ONNX twin of {keras_path.name} (readers use it while the .keras file is unchanged)")
    return path
