"""Scoring a model on a split: exact match, CER and CTC loss from one prediction pass (validation at each
epoch's end, and the test split at a run's end), and the run's report: metrics.json and its plots."""

import dataclasses
import json

import keras
import numpy as np

import metrics
import model
import plots
import preprocess
import reader
import runstate


def evaluate(keras_model, batches, charset, labels):
    """Exact match (case-sensitive and not), CER and CTC loss of `keras_model` on every batch of
    `batches`, from one pass of predictions. Returns (scores, predictions, confidences)."""
    predictions, confidences, loss_sum = [], [], 0.0
    ctc = model.CTCLoss(charset.blank_index)
    for i in range(len(batches)):
        images, encoded = batches[i]
        probs = keras_model.predict_on_batch(images)[: len(images)]  # MirroredStrategy may pad a batch for its replicas
        loss_sum += float(keras.ops.convert_to_numpy(ctc(encoded, probs))) * len(images)
        texts, confidence = reader.decode_with_confidence(probs, charset)
        predictions += texts
        confidences += confidence
    return {**metrics.score(predictions, labels), "loss": loss_sum / max(1, len(labels))}, predictions, confidences


def score_run(out, folder, cfg, charset, options, train_set, test_set, test_batches, *, epochs_run, trained,
              train_seconds, repeats=1):
    """The best checkpoint on the test split, which chose nothing (validation chose the checkpoint), so
    this is a clean score; metrics.json and the plots."""
    best, _ = model.load_model(out / runstate.BEST_NAME)
    test_labels = [label for _, label in test_set]
    scores, predictions, confidences = evaluate(best, test_batches, charset, test_labels)
    results = {
        "test": scores,
        "confidence": metrics.confidence_ranking(predictions, test_labels, confidences),
        "checkpoint": str(out / runstate.BEST_NAME),
        "epochs_run": epochs_run,
        "train_seconds_this_session": round(train_seconds, 1),
        "images_per_second_with_validation": round(len(train_set) * repeats * trained / train_seconds, 1),
        "data_dir": str(folder),
        "config": dataclasses.asdict(cfg),
        "log": str(out / runstate.LOG_NAME),
        "examples": [{"truth": t, "prediction": p} for t, p in list(zip(test_labels, predictions))[:20]],
        # every test image's reading: plots.py redraws a run from these, and the misread ones are there to look at
        "readings": [{"path": str(path), "truth": t, "prediction": p, "confidence": float(f"{c:.6g}")}
                     for (path, t), p, c in zip(test_set, predictions, confidences)],
    }
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    shown = np.stack([preprocess.load_image(path, options) for path, _ in test_set[:24]])
    pictures = plots.write_run_plots(out, out / runstate.LOG_NAME, shown, test_labels, predictions)
    print(f"plots: {', '.join(str(p) for p in pictures)}")
    print(f"test split ({scores['count']} images, best checkpoint): exact match {scores['exact_match']:.4f} "
          f"({scores['exact_match_ignore_case']:.4f} ignoring case), CER {scores['cer']:.4f}; wrote {out / 'metrics.json'}")
    ranked = results["confidence"]
    if ranked["count_rest"] and ranked["count_confident"]:
        print(f"confidence ranks errors: exact match {ranked['exact_match_confident']:.4f} on the "
              f"{ranked['count_confident']} most confident readings (confidence >= {ranked['threshold']:.3f}), "
              f"{ranked['exact_match_rest']:.4f} on the other {ranked['count_rest']}")
    return results
