"""Scoring a model on a split: exact match, CER and CTC loss from one prediction pass (validation at each
epoch's end, and the test split at a run's end), and the run's report: metrics.json and its plots."""

import dataclasses
import json

import quiet  # noqa: F401  (first: TensorFlow's start-up lines off; quiet.py)
import keras
import numpy as np

import metrics
import model
import modelmeta
import plots
import preprocess
import reader
import runstate


def evaluate(keras_model, batches, charset, labels, lengths=None):
    """Exact match (case-sensitive and not), CER and CTC loss of `keras_model` on every batch of
    `batches`, from one pass of predictions. lengths: the typed lengths (reader.typed_lengths), for readings
    of another length to be refit as every reader refits them. Returns (scores, reader.Decoded)."""
    predictions, confidences, refit, loss_sum = [], [], [], 0.0
    ctc = model.CTCLoss(charset.blank_index)
    for i in range(len(batches)):
        images, encoded = batches[i]
        probs = keras_model.predict_on_batch(images)[: len(images)]  # MirroredStrategy may pad a batch for its replicas
        loss_sum += float(keras.ops.convert_to_numpy(ctc(encoded, probs))) * len(images)
        decoded = reader.decode_with_confidence(probs, charset, lengths=lengths)
        predictions += decoded.texts
        confidences += decoded.confidences
        refit += decoded.refit
    scores = {**metrics.score(predictions, labels), "loss": loss_sum / max(1, len(labels))}
    return scores, reader.Decoded(predictions, confidences, refit)


def store_abstention(path, val_batches, val_labels, charset, precision, keras_model=None):
    """Chooses, on the validation split, the confidence threshold above which the model at `path` (already
    loaded: `keras_model`) reads at `precision`, and stores it in the file's metadata ("abstain"), where every
    reader finds it. Readings refit to a typed length are marked low by every reader whatever their
    confidence (reader.LowConfidenceRule), so they are left out of the choice as they will be out of use.
    Returns (the stored "abstain", the validation readings)."""
    if keras_model is None:
        keras_model, _ = model.load_model(path)
    lengths = typed_lengths(path)
    _, decoded = evaluate(keras_model, val_batches, charset, val_labels, lengths)
    predictions = decoded.texts
    chosen = metrics.abstention_threshold([p == t for p, t in zip(predictions, val_labels)], decoded.confidences,
                                          precision, trusted_lengths(decoded, lengths))
    abstain = {"target_precision": precision, "threshold": chosen["threshold"], "val_precision": chosen["precision"],
               "val_coverage": chosen["coverage"], "val_count": chosen["count"]}
    model.update_meta(path, {"abstain": abstain})
    return abstain, predictions


def typed_lengths(path):
    """The lengths of the labels typed for the model at `path` (reader.typed_lengths)."""
    return reader.typed_lengths(modelmeta.read_meta(path) or {})


def trusted_lengths(decoded, lengths):
    """For each reading, whether the network read it at a length the typed labels have (not refit to one)."""
    return [reader.read_at_typed_length(text, refit, lengths) for text, refit in zip(decoded.texts, decoded.refit)]


def keep_final_unless_lowest_is_better(out, val_labels, lowest_predictions, final_predictions):
    """After a one-cycle schedule, which ends at a low learning rate: the final epoch's model becomes the run's
    model (crnn_ctc_best.keras) unless the checkpoint of lowest validation CER reads the validation split better
    beyond chance (metrics.better_beyond_chance); that checkpoint is then kept as crnn_ctc_lowest_val_cer.keras.
    The lowest of a few dozen validation readings over 60 epochs is often one epoch's luck. Returns "final" or
    "best checkpoint" and the two validation counts."""
    best_path = out / runstate.BEST_NAME
    lowest_right = [p == t for p, t in zip(lowest_predictions, val_labels)]
    final_right = [p == t for p, t in zip(final_predictions, val_labels)]
    counts = {"lowest_val_cer_right": sum(lowest_right), "final_right": sum(final_right), "val_count": len(val_labels)}
    swapped = (modelmeta.read_meta(best_path) or {}).get("kept")
    if swapped:  # chosen again after the swap below (a stop while scoring): what was decided then stands
        return "final", {k: v for k, v in swapped.items() if k != "model"}
    if metrics.earlier_better(final_right, [lowest_right]):
        (out / runstate.LOWEST_VAL_NAME).unlink(missing_ok=True)  # an earlier run's, in the same --out
        return "best checkpoint", counts
    model.copy_with_meta(best_path, out / runstate.LOWEST_VAL_NAME)
    model.copy_with_meta(out / runstate.FINAL_NAME, best_path, {"kept": {"model": "final", **counts}})
    return "final", counts


@dataclasses.dataclass
class RunModel:
    """Which model a run kept (choose_run_model) and what validation said of it."""

    kept: str  # "final" or "best checkpoint"
    counts: dict | None  # validation images right at the final epoch and at the lowest CER (one-cycle runs)
    abstain: dict  # the confidence threshold stored in it
    val_predictions: list


def choose_run_model(out, val_set, val_batches, charset, target_precision, prefer_final=False):
    """The run's model, in crnn_ctc_best.keras: the checkpoint of lowest validation CER, or with `prefer_final` (a
    one-cycle schedule) the final epoch's unless that checkpoint reads validation better beyond chance
    (keep_final_unless_lowest_is_better, which swaps the files). Each candidate's confidence threshold is chosen
    on validation and stored in it. Returns a RunModel."""
    val_labels = [label for _, label in val_set]
    final_abstain, final_predictions = store_abstention(out / runstate.FINAL_NAME, val_batches, val_labels, charset,
                                                        target_precision)
    abstain, val_predictions = store_abstention(out / runstate.BEST_NAME, val_batches, val_labels, charset,
                                                target_precision)
    if not prefer_final:
        return RunModel("best checkpoint", None, abstain, val_predictions)
    kept, counts = keep_final_unless_lowest_is_better(out, val_labels, val_predictions, final_predictions)
    right = (f"validation: {counts['final_right']} of {counts['val_count']} right at the final epoch, "
             f"{counts['lowest_val_cer_right']} at the lowest CER")
    print(f"the run's model, {out / runstate.BEST_NAME}: " + (
        f"the final epoch's ({right}: not better beyond chance; that epoch is kept as {runstate.LOWEST_VAL_NAME})"
        if kept == "final" else f"the epoch of lowest validation CER ({right}: better beyond chance)"))
    if kept == "final":
        return RunModel(kept, counts, final_abstain, final_predictions)
    return RunModel(kept, counts, abstain, val_predictions)


@dataclasses.dataclass
class RunRecord:
    """What metrics.json records of how the run trained, beside its scores."""

    folder: object
    config: dict  # the run's flags, as a dict
    epochs_run: int
    trained: int  # epochs trained in this session
    train_seconds: float
    images_per_epoch: int = 0  # training images an epoch (its passes, or the steps of a run that follows validation)
    steps_run: int = 0  # optimizer steps in all the run's epochs


def score_run(out, chosen, record, charset, options, val_set, test_set, test_batches):
    """The run's model (`chosen`, a RunModel) on the test split, which chose nothing (validation chose the model
    and its threshold), so this is a clean score; writes metrics.json and the plots, and moves no file."""
    abstain = chosen.abstain
    run_model, _ = model.load_model(out / runstate.BEST_NAME)
    test_labels = [label for _, label in test_set]
    lengths = typed_lengths(out / runstate.BEST_NAME)
    scores, decoded = evaluate(run_model, test_batches, charset, test_labels, lengths)
    predictions, confidences = decoded.texts, decoded.confidences
    on_test = metrics.abstention_scores([p == t for p, t in zip(predictions, test_labels)], confidences,
                                        abstain["threshold"], trusted_lengths(decoded, lengths))
    abstain = {**abstain, "test_coverage": on_test["coverage"], "test_precision": on_test["precision"]}
    seconds = max(record.train_seconds, 1e-6)
    results = {
        "test": scores,
        "abstain": abstain,
        "confidence": metrics.confidence_ranking(predictions, test_labels, confidences),
        "checkpoint": str(out / runstate.BEST_NAME),
        "kept": {"model": chosen.kept, **(chosen.counts or {})},
        "epochs_run": record.epochs_run,
        "steps_run": record.steps_run,
        "train_seconds_this_session": round(seconds, 1),
        "images_per_second_with_validation": round(record.images_per_epoch * record.trained / seconds, 1),
        "data_dir": str(record.folder),
        "config": record.config,
        "log": str(out / runstate.LOG_NAME),
        "examples": [{"truth": t, "prediction": p} for t, p in list(zip(test_labels, predictions))[:20]],
        # every test image's reading: plots.py redraws a run from these, and the misread ones are there to look at
        "readings": [{"path": str(path), "truth": t, "prediction": p, "confidence": float(f"{c:.6g}")}
                     for (path, t), p, c in zip(test_set, predictions, confidences)],
        # the validation split's readings: self-training compares its rounds on them, image by image
        "val_readings": [{"path": str(path), "truth": t, "prediction": p}
                         for (path, t), p in zip(val_set, chosen.val_predictions)],
    }
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    shown = np.stack([preprocess.load_image(path, options.image_only()) for path, _ in test_set[:24]])
    pictures = plots.write_run_plots(out, out / runstate.LOG_NAME, shown, test_labels, predictions)
    print(f"plots: {', '.join(str(p) for p in pictures)}")
    print(f"test split ({scores['count']} images, the run's model): exact match {scores['exact_match']:.4f} "
          f"({scores['exact_match_ignore_case']:.4f} ignoring case), CER {scores['cer']:.4f}; wrote {out / 'metrics.json'}")
    print(describe_abstention(abstain))
    if abstain["val_coverage"] < 0.5:  # the model's errors are not its least confident readings, or too few were read
        print(f"  few readings reach precision {abstain['target_precision']:g}: a lower --target_precision when "
              f"training, or --min_confidence when reading, marks fewer low")
    ranked = results["confidence"]
    if ranked["count_rest"] and ranked["count_confident"]:
        print(f"confidence ranks errors: exact match {ranked['exact_match_confident']:.4f} on the "
              f"{ranked['count_confident']} most confident readings (confidence >= {ranked['threshold']:.3f}), "
              f"{ranked['exact_match_rest']:.4f} on the other {ranked['count_rest']}")
    return results


def describe_abstention(abstain):
    if abstain["threshold"] is None:
        return (f"abstention: no confidence threshold reads validation at precision {abstain['target_precision']:g}; "
                f"every reading will be marked low")
    test_precision = "-" if abstain["test_precision"] is None else f"{abstain['test_precision']:.4f}"
    return (f"abstention (stored in the model): readings at confidence >= {abstain['threshold']:.4g} "
            f"of a length the typed labels have are trusted; "
            f"validation: {abstain['val_coverage']:.1%} of {abstain['val_count']} kept at precision "
            f"{abstain['val_precision']:.4f} (target {abstain['target_precision']:g}); test: "
            f"{abstain['test_coverage']:.1%} kept at precision {test_precision}")
