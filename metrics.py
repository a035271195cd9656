"""Scoring readings against labels: one definition for train.py, test.py, bench.py and plots.py.

exact match: the share of images read exactly right (and ignoring letter case, for sites that do);
CER: total edit distance over total label characters, the reference's definition.
"""

import numpy as np
from rapidfuzz.distance import Levenshtein


def character_error_rate(predictions, truths):
    """Total edit distance over total characters of the truths."""
    edits = sum(Levenshtein.distance(p, t) for p, t in zip(predictions, truths))
    return edits / max(1, sum(len(t) for t in truths))


def score(predictions, labels):
    """{exact_match, exact_match_ignore_case, cer, count} of predictions against their labels."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return {"exact_match": 0.0, "exact_match_ignore_case": 0.0, "cer": 0.0, "count": 0}
    return {
        "exact_match": float(np.mean([p == t for p, t in zip(predictions, labels)])),
        "exact_match_ignore_case": float(np.mean([p.lower() == t.lower() for p, t in zip(predictions, labels)])),
        "cer": character_error_rate(predictions, labels),
        "count": len(labels),
    }


def unscorable_reason(label, charset, max_len):
    """Why a file-name label cannot be a label of this model (None if it can): such names
    (`IMG_1234.png`) are not scored. charset None: a reader of any symbol (a teacher such as ddddocr)."""
    if not label:
        return "no label in the file name"
    unknown = charset.unknown_symbols(label) if charset is not None else ""
    if unknown:
        return f"symbols outside the model's charset ({unknown})"
    if max_len and len(label) > max_len:
        return f"longer than the model's {max_len} characters"
    return None


def confidence_ranking(predictions, labels, confidences, keep=0.9):
    """Does confidence rank errors? Exact match of the `keep` share of readings with the highest
    confidence, and of the rest, plus the confidence that separates them: a caller that retries
    below that threshold trades the rest's answers for fresh captchas."""
    order = np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")
    kept = int(round(keep * len(order)))
    right = np.array([p == t for p, t in zip(predictions, labels)])[order]
    return {
        "keep": keep,
        "threshold": float(np.asarray(confidences)[order[kept - 1]]) if kept else None,
        "exact_match_confident": float(right[:kept].mean()) if kept else None,
        "exact_match_rest": float(right[kept:].mean()) if kept < len(order) else None,
        "count_confident": kept,
        "count_rest": len(order) - kept,
    }


def abstention_threshold(correct, confidences, precision=0.99, eligible=None):
    """The lowest confidence at which the readings kept (confidence >= it) are right at least `precision` of
    the time on this split: the most readings a caller can trust at that precision. Readings not `eligible`
    (a length no typed label has: reader.LowConfidenceRule) are never kept, whatever their confidence.
    Returns {threshold, precision (reached), coverage (share of all readings kept), count}; threshold None
    when even the most confident eligible reading alone misses the target (every reading is low)."""
    confidences = np.asarray(confidences, dtype=np.float64)
    eligible = np.ones(len(confidences), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    order = np.argsort(-confidences[eligible], kind="stable")
    right = np.asarray(correct, dtype=np.float64)[eligible][order]
    ranked = confidences[eligible][order]
    reached = np.cumsum(right) / np.arange(1, len(right) + 1)  # precision of the k most confident, k = 1..n
    # a cut can only fall between distinct confidences: readings of equal confidence are kept or dropped together
    cuts = np.flatnonzero((reached >= precision) & np.append(ranked[1:] < ranked[:-1], True))
    if not len(cuts):
        return {"threshold": None, "precision": None, "coverage": 0.0, "count": len(confidences)}
    kept = cuts[-1] + 1
    return {"threshold": float(ranked[kept - 1]), "precision": float(reached[kept - 1]),
            "coverage": float(kept / len(confidences)), "count": len(confidences)}


def abstention_scores(correct, confidences, threshold, eligible=None):
    """How readings kept at `threshold` fare: {coverage, precision, count} (a None threshold keeps none; readings
    not `eligible` are never kept)."""
    correct = np.asarray(correct, dtype=bool)
    kept = (np.asarray(confidences, dtype=np.float64) >= threshold if threshold is not None
            else np.zeros(len(correct), dtype=bool))
    if eligible is not None:
        kept &= np.asarray(eligible, dtype=bool)
    return {"coverage": float(kept.mean()) if len(kept) else 0.0,
            "precision": float(correct[kept].mean()) if kept.any() else None, "count": len(correct)}


def better_beyond_chance(correct_a, correct_b, alpha=0.05):
    """Whether readings A are right more often than readings B of the same images by more than chance: of the
    images exactly one of them reads right, A reads right so many that a fair coin would do so with probability
    under `alpha` (an exact one-sided sign test, McNemar's test for paired readings)."""
    only_a = sum(a and not b for a, b in zip(correct_a, correct_b))
    only_b = sum(b and not a for a, b in zip(correct_a, correct_b))
    from scipy.stats import binomtest  # here: scipy.stats takes about a second to import, and readers never need it

    return only_a > 0 and binomtest(only_a, only_a + only_b, 0.5, alternative="greater").pvalue < alpha


def earlier_better(latest_right, earlier_rights):
    """The rule a run keeps its model by, and self-training its round: the latest model (the final epoch, the last
    round) is kept unless an earlier one reads the validation images better beyond chance (better_beyond_chance,
    image by image: a few dozen validation images cannot tell one error from noise). latest_right: for each
    validation image, whether the latest model read it right; earlier_rights: the same for each earlier model.
    Returns the indices of the earlier models that are better beyond chance ([]: keep the latest)."""
    return [i for i, right in enumerate(earlier_rights) if better_beyond_chance(right, latest_right)]
