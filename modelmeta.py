"""A model file's metadata, read without Keras: what the model reads and how its pixels were prepared.

Every model this project writes carries a `captcha_meta.json`: inside a .keras archive (a member of
the zip), inside an .onnx file (its metadata_props), or beside a .tflite file (M.tflite.json). It
holds the charset with the blank's index, the label length, the preprocessing options and the
network's settings, so readers never need them typed again. Reading it needs no TensorFlow.
"""

import json
import zipfile
from pathlib import Path

from charsets import Charset
from errors import CaptchaError
from preprocess import REFERENCE_PREPROCESSING

META_MEMBER = "captcha_meta.json"
META_VERSION = 3  # 2: preprocessing has resize mode and CLAHE settings (files without them mean the defaults);
#                  3: the model reads an asked colour (preprocessing's colours), which a release before it would drop


def make_meta(charset, max_len, preprocess_options, config):
    return {
        # a plain model stays readable by the releases before asked colours
        "format_version": META_VERSION if preprocess_options.canvas.colours else 2,
        "charset": charset.to_dict(),
        "max_len": max_len,
        "preprocess": preprocess_options.to_dict(),
        "model_config": config.to_dict() if config is not None else None,
    }


def read_archive_member(path, member):
    """Bytes of one member of a .keras archive, or None if it has none by that name.

    Archives with members that could land outside a folder when extracted (`../x`, `/x`) are
    refused outright: such a file was made to attack, not to be loaded.
    """
    path = Path(path)
    if not path.exists():
        raise CaptchaError(f"{path}: model file does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            unsafe = [n for n in names if n.startswith(("/", "\\")) or ".." in Path(n.replace("\\", "/")).parts]
            if unsafe:
                raise CaptchaError(f"{path}: archive member {unsafe[0]!r} points outside the archive; refusing it")
            if member not in names:
                return None
            return archive.read(member)
    except (zipfile.BadZipFile, OSError) as e:
        raise CaptchaError(f"{path}: not a Keras .keras archive ({e})") from None


def check_meta_version(meta, path):
    """Metadata from a newer release may mean preprocessing this one cannot repeat: refuse it."""
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > META_VERSION:
        raise CaptchaError(f"{path}: metadata format {version!r} is newer than this release reads ({META_VERSION}); "
                           f"update the project to read this model")
    return meta


def read_meta(path):
    raw = read_archive_member(path, META_MEMBER)
    return check_meta_version(json.loads(raw), path) if raw is not None else None


def lambda_layer_names(path):
    """Names of the Lambda layers in a .keras archive's config, read as JSON (no code runs)."""
    raw = read_archive_member(path, "config.json")
    if raw is None:
        raise CaptchaError(f"{path}: not a Keras .keras archive (no config.json)")
    config = json.loads(raw)
    return [layer["config"]["name"] for layer in config.get("config", {}).get("layers", [])
            if layer.get("class_name") == "Lambda"]


def reference_meta(num_classes):
    """What a checkpoint without metadata is assumed to be: the reference's 62 symbols, blank last."""
    charset = Charset(blank_index=len(Charset().symbols))
    if num_classes != charset.num_classes:
        raise CaptchaError(
            f"model has {num_classes} output classes and no saved charset; the reference charset needs "
            f"{charset.num_classes}: pass --charset with the {num_classes - 1} symbols it was trained on"
        )
    return make_meta(charset, 5, REFERENCE_PREPROCESSING, None)


def tflite_meta_path(path):
    """A .tflite file holds no metadata of ours: it sits beside it, as M.tflite.json."""
    return Path(path).with_name(Path(path).name + ".json")
