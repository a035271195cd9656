"""Read captchas with any model this project writes: .keras (Keras), .onnx (onnxruntime), .tflite (LiteRT).

    from reader import Reader
    reader = Reader.load("saved_model/crnn_ctc_best.onnx")
    reading = reader.read(image_bytes)  # or a path, or a decoded image -> Reading(text, confidence, low, answer)

One reading path for test.py, serve.py and speed.py: the model's own preprocessing (from its
metadata), the network, then greedy CTC decoding (or beam search) with a confidence per text.
Exported models (.onnx, .tflite) are read without importing Keras or TensorFlow, so a reader or a
server that uses one starts in a second and stays small; only a .keras file loads Keras.

Confidence: with greedy decoding, the probability of the decoded path, i.e. the product over the
time steps of the highest class probability at each (blanks included). With beam search, the
beam's probability of its text. Both lie in (0, 1]; a wrong reading usually has a low one.

Lengths: a model stores the lengths of the labels people typed for it. A reading of another length is
wrong however confident (CTC dropped a faint symbol under its neighbour, or merged a doubled one), so
it is decoded again: the likeliest text of a typed length from a CTC beam search. It stays marked
low_confidence (Decoded.refit): it is a better guess, not a trusted reading.
"""

import dataclasses
import json
import math
import os
import threading
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

import arithmetic
import charsets
import preprocess
import twin
from modelmeta import META_MEMBER, check_meta_version, tflite_meta_path
from charsets import Charset
from errors import CaptchaError
from preprocess import PreprocessOptions

CASES = ("lower", "upper")  # folds; "keep" (no fold) overrides a model's stored one


# ----------------------------------------------------------------------------- exported networks


class OnnxNetwork:
    """An exported .onnx network run by onnxruntime (thread-safe: concurrent calls need no lock)."""

    thread_safe = True

    def __init__(self, path):
        try:
            import onnxruntime
        except ImportError:
            raise CaptchaError(f"{path}: reading .onnx models needs onnxruntime (pip install onnxruntime)") from None
        options = onnxruntime.SessionOptions()
        options.enable_cpu_mem_arena = False  # the arena keeps a batch's peak for good: 58 MB more at batch 64
        # Idle worker threads wait instead of spinning: a server's sessions (one per model) would otherwise spin
        # against each other and against the request threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise CaptchaError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_shape = tuple(self.session.get_outputs()[0].shape)

    def predict_on_batch(self, images):
        return self.session.run(None, {self.input_name: np.asarray(images, dtype=np.float32)})[0]


def load_onnx(path):
    network = OnnxNetwork(path)
    meta = network.session.get_modelmeta().custom_metadata_map.get(META_MEMBER)
    if meta is None:
        raise CaptchaError(f"{path}: ONNX model without this project's metadata; export it with export_safe.py")
    return network, check_meta_version(json.loads(meta), path)


class TFLiteNetwork:
    """An exported .tflite network run by the LiteRT interpreter (one call at a time)."""

    thread_safe = False

    def __init__(self, path):
        import warnings

        try:
            from ai_edge_litert.interpreter import (
                Interpreter,  # TFLite's own package: no TensorFlow
            )
        except ImportError:
            import tensorflow as tf

            Interpreter = tf.lite.Interpreter
        try:
            with warnings.catch_warnings():  # tf.lite.Interpreter works; it only warns that it will move
                warnings.simplefilter("ignore", UserWarning)
                self.interpreter = Interpreter(model_path=str(path))
        except Exception as e:  # the interpreter raises ValueError/RuntimeError for files it can't read
            raise CaptchaError(f"{path}: not a readable TFLite model ({str(e).splitlines()[0]})") from None
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.output_shape = tuple(self.interpreter.get_output_details()[0]["shape_signature"])
        self.batch = None

    def predict_on_batch(self, images):
        images = np.asarray(images, dtype=np.float32)
        if self.batch != len(images):  # the network takes any batch size; the interpreter sizes its buffers once per size
            self.interpreter.resize_tensor_input(self.input, images.shape)
            self.interpreter.allocate_tensors()
            self.batch = len(images)
        self.interpreter.set_tensor(self.input, images)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()


def load_tflite(path):
    meta_path = tflite_meta_path(path)
    if not meta_path.exists():
        raise CaptchaError(f"{path}: its metadata {meta_path.name} is missing; export it with export_safe.py")
    try:
        meta = check_meta_version(json.loads(meta_path.read_text()), meta_path)
        charset = Charset.from_dict(meta["charset"])
    except (ValueError, KeyError, TypeError) as e:
        raise CaptchaError(f"{meta_path}: not this project's model metadata ({type(e).__name__}: {e})") from None
    network = TFLiteNetwork(path)
    if network.output_shape[-1] != charset.num_classes:
        raise CaptchaError(f"{path}: outputs {network.output_shape[-1]} classes but {meta_path.name} gives "
                           f"{charset.num_classes} (symbols + blank)")
    return network, meta


def load(path, safe_mode=True):
    """(network with predict_on_batch, metadata) from a .keras, .onnx or .tflite file. A .keras file is read
    through its ONNX twin (twin.py) while that is the same model, without Keras."""
    path = Path(path)
    exported = {".onnx": load_onnx, ".tflite": load_tflite}.get(path.suffix.lower())
    if exported:
        if not path.exists():
            raise CaptchaError(f"{path}: model file does not exist")
        return exported(path)
    twin_file = twin.twin_path(path)
    if safe_mode and path.exists() and twin_file.exists():
        try:
            network, meta = load_onnx(twin_file)
        except CaptchaError:  # an unreadable twin is no twin: the .keras file is read
            network, meta = None, {}
        if twin.is_twin_of(meta, path):
            return network, meta
    import model  # Keras, and with it TensorFlow, load only for .keras files

    return model.load_model(path, safe_mode=safe_mode)


# ----------------------------------------------------------------------------- decoding


def symbols_arg(value, charset, flag="--allowed"):
    """The symbols of --allowed (a charset preset name such as digits, or the symbols themselves), checked
    against what the model reads."""
    symbols = charsets.CHARSET_PRESETS.get(value, value)
    missing = "".join(sorted(set(symbols) - set(charset.symbols)))
    if missing:
        raise CaptchaError(f"{flag} {value!r}: the model cannot read {missing!r} (it reads {charset.symbols!r})")
    return symbols


def restrict(probs, charset, allowed=None, case=None):
    """Class probabilities (batch, T, classes) with the choice narrowed before decoding.

    case "lower"/"upper": each letter's probability is added to its other case's where the model
    reads both, so a site that ignores case gets the letter whichever case the model leans to.
    allowed: the symbols that may be read; the others' probabilities are removed. Each time step is
    renormalised, so confidences stay probabilities."""
    if case is None and allowed is None:
        return probs
    probs = np.array(probs, dtype=np.float32)  # a copy: the caller's array stays as the network gave it
    index = {symbol: charset.encode(symbol)[0] for symbol in charset.symbols}
    if case is not None:
        for symbol, i in index.items():
            folded = charsets.fold_case(symbol, case)
            if folded != symbol and folded in index:
                probs[:, :, index[folded]] += probs[:, :, i]
                probs[:, :, i] = 0.0
    if allowed is not None:
        for symbol, i in index.items():
            if symbol not in allowed:
                probs[:, :, i] = 0.0
    return probs / np.maximum(probs.sum(axis=-1, keepdims=True), 1e-12)


REFIT_BEAM_WIDTH = 16  # wide enough that texts one symbol longer than the greedy one stay in the beam


class Decoded(typing.NamedTuple):
    """Texts read from a batch; confidence per text; refit: read again within the typed lengths (see above)."""

    texts: list
    confidences: list
    refit: list


def decode_with_confidence(probs, charset, beam_width=0, case=None, lengths=None):
    """Softmax output (batch, T, classes) -> Decoded. beam_width 0 or 1: greedy. lengths (shortest, longest):
    a reading of another length is replaced by the likeliest text of an allowed length the beam search finds."""
    probs = np.asarray(probs, dtype=np.float32)
    if beam_width and beam_width > 1:
        texts, confidences, refit = _beam_search(probs, charset, beam_width, lengths)
    else:
        best = probs.argmax(axis=-1)  # (batch, T)
        confidences = np.exp(np.log(np.clip(probs.max(axis=-1).astype(np.float64), 1e-30, 1.0)).sum(axis=-1))
        texts, refit = [], [False] * len(probs)
        for path in best:
            kept = path[np.insert(path[1:] != path[:-1], 0, True)]  # repeats merge; then blanks go
            texts.append(charset.decode(kept[kept != charset.blank_index]))
        for i, text in enumerate(texts):
            if not length_allowed(text, lengths):  # rare: the beam search only for these
                (texts[i],), (confidences[i],), _ = _beam_search(probs[i : i + 1], charset, REFIT_BEAM_WIDTH, lengths)
                refit[i] = True  # greedy read another length, even where the beam's likeliest text has a typed one
    if case is not None:  # symbols the model reads in one case only
        texts = [charsets.fold_case(text, case) for text in texts]
    return Decoded(texts, [float(c) for c in confidences], list(refit))


def decode(probs, charset, beam_width=0):
    """Softmax output (batch, T, classes) -> list of strings. beam_width 0 or 1: greedy."""
    return decode_with_confidence(probs, charset, beam_width).texts


def _beam_search(probs, charset, beam_width, lengths=None, floor=1e-6):
    """CTC prefix beam search, in NumPy: the same for .keras, .onnx and .tflite models, none of which then
    needs Keras. Each beam is a text with the probability of all the paths that read it, ending in a blank
    or not (so "aa" needs a blank between its letters); the `beam_width` likeliest texts are kept at each
    step. Classes below `floor` at a step are not tried there (they cannot lift a text into the beam).
    Returns (texts, each text's probability, refit): the likeliest text of a length within `lengths`, refit
    where a text of another length was likelier; the likeliest of all where the beam holds none."""
    blank = charset.blank_index
    texts, scores, refit = [], [], []
    for steps in np.asarray(probs, dtype=np.float64):  # (T, classes)
        beams = {(): (1.0, 0.0)}  # text (class indices) -> (p ending in blank, p ending in its last symbol)
        for p in steps:
            grown = {}

            def add(text, ends_blank, ends_symbol):
                b, s = grown.get(text, (0.0, 0.0))
                grown[text] = (b + ends_blank, s + ends_symbol)

            classes = [c for c in np.flatnonzero(p >= floor) if c != blank]
            for text, (ends_blank, ends_symbol) in beams.items():
                add(text, (ends_blank + ends_symbol) * p[blank], 0.0)
                for c in classes:
                    if text and text[-1] == c:  # the same symbol again: merged, unless a blank came between
                        add(text, 0.0, ends_symbol * p[c])
                        add(text + (c,), 0.0, ends_blank * p[c])
                    else:
                        add(text + (c,), 0.0, (ends_blank + ends_symbol) * p[c])
            beams = dict(sorted(grown.items(), key=lambda item: -sum(item[1]))[:beam_width])
        ranked = sorted(beams.items(), key=lambda item: -sum(item[1]))
        fitting = [item for item in ranked if length_allowed(item[0], lengths)]
        best, (ends_blank, ends_symbol) = (fitting or ranked)[0]
        texts.append(charset.decode(best))
        scores.append(min(1.0, ends_blank + ends_symbol))
        refit.append(bool(fitting) and fitting[0] is not ranked[0])
    return texts, np.array(scores), refit


# ----------------------------------------------------------------------------- the reader


def typed_lengths(meta):
    """(shortest, longest) label a model's readings may have: the lengths of the labels people typed for it
    (stored by train.py), else 1 to its label length; None when a model says neither."""
    if meta.get("label_lengths"):
        return tuple(meta["label_lengths"])
    return (1, meta["max_len"]) if meta.get("max_len") else None


def length_allowed(text, lengths):
    """Whether `text` has a length within `lengths` (shortest, longest); None allows any."""
    return lengths is None or lengths[0] <= len(text) <= lengths[1]


def read_at_typed_length(text, refit, lengths):
    """Whether a reading has a length within `lengths` as the network read it, not refit to one (Decoded.refit)."""
    return not refit and length_allowed(text, lengths)


def describe_lengths(lengths):
    if lengths is None:
        return ""
    shown = str(lengths[0]) if lengths[0] == lengths[1] else f"{lengths[0]}-{lengths[1]}"
    return f", and so are readings of other than {shown} characters"


def checked_min_confidence(value):
    if value is not None and not 0.0 <= value <= 1.0:
        raise CaptchaError(f"--min_confidence {value:g}: a confidence lies between 0 and 1")
    return value


@dataclasses.dataclass(frozen=True)
class LowConfidenceRule:
    """Which readings a caller should not trust (and fetch a new captcha instead): those below `threshold`, and
    those whose likeliest reading had a length outside `lengths`: on a 5-letter site a 4-letter reading is wrong
    however confident (CTC merged a doubled symbol or dropped a faint one), and its refit, the likeliest 5-letter
    text, is a guess. `description` is the line test.py and serve.py print."""

    threshold: float
    lengths: tuple | None
    description: str

    def read_at_typed_length(self, text, refit=False):
        return read_at_typed_length(text, refit, self.lengths)

    def is_low(self, text, confidence, refit=False):
        return confidence < self.threshold or not self.read_at_typed_length(text, refit)


class Reading(typing.NamedTuple):
    """What a caller gets for one captcha (judged): the text read, its confidence, whether not to trust it (fetch a
    new captcha instead: LowConfidenceRule, or an arithmetic reading with no value), and what to type: the text, or
    for a model trained with --answer arithmetic the expression's value (None where it has none, then `reason`)."""

    text: str
    confidence: float
    low: bool
    answer: str | None
    expression: str | None = None  # arithmetic: the expression as computed
    reason: str | None = None  # arithmetic: why there is no answer


def judged(text, confidence, refit, low_rule, answer_mode):
    """The one rule for a Reading: low by `low_rule` (LowConfidenceRule), or, answering arithmetic
    (`answer_mode`), when the expression read has no value."""
    low = low_rule.is_low(text, confidence, refit)
    value = arithmetic.answer_of(text, answer_mode)
    if value is None:
        return Reading(text, confidence, low, text)
    return Reading(text, confidence, low or value.value is None, value.value, value.expression, value.error)


@dataclasses.dataclass
class FileReading:
    """One file's result in a folder: text and confidence, or the reason it could not be read."""

    path: str
    text: str | None = None
    confidence: float | None = None
    error: str | None = None
    refit: bool = False  # read again within the typed lengths (Decoded.refit): always low_confidence


@dataclasses.dataclass(frozen=True)
class ReadSettings:
    """How a Reader reads, past what its model stores (test.py's and serve.py's flags of the same names)."""

    allowed: str | None = None  # read only these symbols (a preset name such as digits, or the symbols)
    case: str | None = None  # None: the model's own letter-case fold; "lower"/"upper" fold; "keep": none
    answer: str | None = None  # None: as the model was trained (its stored "answer"); "text" or "arithmetic"
    min_confidence: float | None = None  # readings below it are low (None: the model's stored threshold)
    beam_width: int = 0  # 0 or 1: greedy decoding; more: a CTC beam search
    no_auto_crop: bool = False
    force_invert: bool = False
    strong: bool = False


class Reader:
    """A model file with its preprocessing and decoding settings; reads images, files or folders."""

    def __init__(self, model_path, settings=ReadSettings(), *, safe_mode=True, warm=False):
        """settings: a ReadSettings. warm: read a blank image at once, so that the first caller waits no longer
        than the next (a server's)."""
        case = settings.case
        if case is not None and case not in (*CASES, "keep"):
            raise CaptchaError(f"unknown --case {case!r}; choose from {', '.join(CASES)}, keep")
        self.path = Path(model_path)
        self.network, self.meta = load(model_path, safe_mode)
        if case is None:
            case = self.meta.get("case")
        case = case if case in CASES else None
        self.charset = Charset.from_dict(self.meta["charset"])
        self.allowed = symbols_arg(settings.allowed, self.charset) if settings.allowed else None
        self.case, self.beam_width = case, settings.beam_width
        self.answer = arithmetic.check_answer(settings.answer or self.meta.get("answer") or "text")
        self.lengths = typed_lengths(self.meta)
        options = PreprocessOptions.from_dict(self.meta["preprocess"])  # resize mode and CLAHE settings included
        self.options = dataclasses.replace(options, auto_crop=options.auto_crop and not settings.no_auto_crop,
                                           force_invert=options.force_invert or settings.force_invert,
                                           strong=options.strong or settings.strong)
        self.low_rule = self.low_confidence_rule(checked_min_confidence(settings.min_confidence))
        # Keras models and the TFLite interpreter keep state between calls: one call at a time.
        self.lock = threading.Lock() if not getattr(self.network, "thread_safe", False) else None
        if warm:
            blank = cv2.imencode(".png", np.full((50, 200), 255, np.uint8))[1].tobytes()
            self.predict(self.prepare_encoded(blank, "warm-up", self.colours[0] if self.colours else None)[np.newaxis])

    @property
    def colours(self):
        """The colours this model can be asked for (empty: it reads every image as it is)."""
        return self.options.canvas.colours

    @classmethod
    def load(cls, model_path, *, safe_mode=True, warm=False, **settings):
        """The reader of a model file (.onnx, .tflite, or .keras, read through its ONNX twin when it has one);
        `settings`: ReadSettings' fields, by keyword (allowed=, case=, answer=, min_confidence=, ...)."""
        return cls(model_path, ReadSettings(**settings), safe_mode=safe_mode, warm=warm)

    def read(self, image, colour=None):
        """One captcha -> Reading. `image`: its encoded bytes (png, jpg, ...: what a scraper downloads), a file
        path, or a decoded image (preprocess.read_image). `colour`: the colour the captcha asks for ("type the red
        characters"), for a model trained with one (`colours`)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            prepared = self.prepare_encoded(bytes(image), "image", colour)
        elif isinstance(image, (str, os.PathLike)):
            prepared = preprocess.load_image(image, self.options, asked=colour)
        else:
            prepared = preprocess.preprocess_image(np.asarray(image), self.options, asked=colour)
        return self.judge(self.predict(prepared[np.newaxis]))[0]

    def judge(self, decoded):
        """Decoded (from predict) -> [Reading], by this reader's low-confidence rule and answer mode."""
        return [judged(text, confidence, refit, self.low_rule, self.answer) for text, confidence, refit in zip(*decoded)]

    def low_confidence_rule(self, given=None):
        """When a reading is marked low_confidence: below `given` (--min_confidence) if set, else below the
        model's stored threshold; and, either way, of a length no label people typed for it has."""
        lengths = self.lengths
        if given is not None:
            return LowConfidenceRule(given, lengths, f"readings below confidence {given:g} are marked low "
                                                     f"(--min_confidence){describe_lengths(lengths)}")
        abstain = self.meta.get("abstain")
        if not abstain:
            return LowConfidenceRule(0.0, lengths, "no confidence threshold stored in the model: no reading is marked "
                                                   f"low by confidence (--min_confidence sets one){describe_lengths(lengths)}")
        where = (f"the model's threshold for precision {abstain['target_precision']:g} on its validation split, "
                 f"which kept {abstain['val_coverage']:.0%} of its {abstain['val_count']} readings")
        if abstain["threshold"] is None:
            return LowConfidenceRule(math.inf, lengths, f"every reading is marked low: no confidence reached {where} "
                                                        f"(--min_confidence overrides)")
        return LowConfidenceRule(abstain["threshold"], lengths, (
            f"readings below confidence {abstain['threshold']:.4g} are marked low: {where} (--min_confidence "
            f"overrides){describe_lengths(lengths)}"))

    def predict(self, images):
        """Preprocessed images (batch, H, W, 1) -> Decoded (texts, confidences, refit)."""
        if self.lock is None:
            probs = self.network.predict_on_batch(images)
        else:
            with self.lock:
                probs = self.network.predict_on_batch(images)
        probs = restrict(probs, self.charset, self.allowed, self.case)
        return decode_with_confidence(probs, self.charset, self.beam_width, self.case, self.lengths)

    def prepare_encoded(self, data, name, colour=None):
        """Encoded image bytes (an upload) -> model input; CaptchaError naming `name` if unreadable, or if the
        asked `colour` is missing or unknown."""
        return preprocess.preprocess_image(preprocess.decode_image(data, name, self.options.canvas.channels), self.options,
                                           asked=colour)

    def read_paths(self, paths, batch_size=64, debug_dir=None, augmentation_for=None, asked=None):
        """Yield a FileReading per path, in order; reads the next batch's files while predicting this one.
        augmentation_for(path): a function of the 8-bit canvas (augment.augment, seeded per image) that alters it
        before reading, or None: for readings of altered copies (selftrain's agreement filter). asked {path: colour}:
        the colour each captcha asks for, for a model that reads one."""
        asked = asked or {}
        batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        # One thread prepares the next batch, spreading its images over two more (OpenCV frees the GIL).
        with ThreadPoolExecutor(1) as prefetch, ThreadPoolExecutor(2) as pool:
            def load_batch(batch):
                return list(pool.map(lambda p: self.prepare(p, debug_dir, augmentation_for, asked.get(str(p))), batch))

            pending = prefetch.submit(load_batch, batches[0]) if batches else None
            for i, batch in enumerate(batches):
                prepared = pending.result()
                pending = prefetch.submit(load_batch, batches[i + 1]) if i + 1 < len(batches) else None
                good = [image for image, error in prepared if error is None]
                results = iter(zip(*self.predict(np.stack(good)))) if good else iter(())
                for path, (image, error) in zip(batch, prepared):
                    if error:
                        yield FileReading(str(path), error=error)
                    else:
                        text, confidence, refit = next(results)
                        yield FileReading(str(path), text, confidence, refit=refit)

    def prepare(self, path, debug_dir=None, augmentation_for=None, colour=None):
        """-> (model input, None) or (None, error message). Writes the stages when debugging."""
        try:
            stages = {} if debug_dir else None
            image = preprocess.preprocess_image(preprocess.read_image(path, self.options.canvas.channels), self.options, stages,
                                                augmentation_for(path) if augmentation_for else None, colour)
        except CaptchaError as e:
            return None, str(e)
        if debug_dir:
            for name, stage in stages.items():
                cv2.imwrite(os.path.join(debug_dir, f"{Path(path).stem}_{name}.png"), stage)
        return image, None
