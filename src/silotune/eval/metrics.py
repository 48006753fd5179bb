"""Evaluation metrics: accuracy, macro-F1, ROUGE-L, exact match and perplexity, in plain Python."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check_pairs(preds: Sequence[object], golds: Sequence[object], what: str) -> None:
    """Require two non-empty sequences of equal length."""
    if len(preds) != len(golds):
        raise ValueError(f"{what}: got {len(preds)} predictions for {len(golds)} references.")
    if not preds:
        raise ValueError(f"{what}: no predictions to score.")


def accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of predictions equal to their gold label.

    Parameters
    ----------
    preds, golds : sequence of str
        Predicted and gold labels, same non-zero length.

    Returns
    -------
    float
        In [0, 1].
    """
    _check_pairs(preds, golds, "accuracy")
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def macro_f1(
    preds: Sequence[str], golds: Sequence[str], labels: Sequence[str] | None = None
) -> float:
    """Unweighted mean of per-class F1 scores.

    Parameters
    ----------
    preds, golds : sequence of str
        Predicted and gold labels, same non-zero length.
    labels : sequence of str or None
        Classes to average over; default: every label seen in `golds` or `preds`.

    Returns
    -------
    float
        In [0, 1].

    Notes
    -----
    Per class, ``F1 = 2 TP / (2 TP + FP + FN)``. A class with no gold example and no prediction
    has no defined F1 and is left out of the mean; a class that is predicted but never gold
    scores 0 (as in scikit-learn with ``labels`` = the union of both). With explicit `labels`,
    a prediction outside them still counts as a miss for its gold class but adds no class.
    """
    _check_pairs(preds, golds, "macro_f1")
    classes = sorted(set(golds) | set(preds)) if labels is None else list(dict.fromkeys(labels))
    scores = []
    for label in classes:
        tp = sum(p == label and g == label for p, g in zip(preds, golds, strict=True))
        fp = sum(p == label and g != label for p, g in zip(preds, golds, strict=True))
        fn = sum(p != label and g == label for p, g in zip(preds, golds, strict=True))
        if tp + fp + fn == 0:
            continue  # no support and never predicted: undefined, excluded
        scores.append(2 * tp / (2 * tp + fp + fn))
    if not scores:
        raise ValueError("macro_f1: none of the given labels occurs in preds or golds.")
    return sum(scores) / len(scores)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            if token_a == token_b:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure between two strings, on whitespace tokens.

    Parameters
    ----------
    prediction, reference : str
        Texts; tokens are ``str.split()`` pieces, compared case-sensitively.

    Returns
    -------
    float
        ``2 P R / (P + R)`` with ``P = LCS / len(prediction)`` and
        ``R = LCS / len(reference)``; 0.0 when either text has no token (as in ``rouge-score``).
    """
    pred_tokens, ref_tokens = prediction.split(), reference.split()
    if not pred_tokens or not ref_tokens:
        return 0.0
    lcs = _lcs_length(pred_tokens, ref_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred_tokens), lcs / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean of `rouge_l` over aligned prediction/reference pairs (same non-zero length)."""
    _check_pairs(preds, refs, "mean_rouge_l")
    return sum(rouge_l(p, r) for p, r in zip(preds, refs, strict=True)) / len(refs)


def normalize_answer(text: str) -> str:
    """The form exact match compares: stripped, lower-cased, runs of whitespace made one space."""
    return " ".join(text.lower().split())


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize_answer` (same length)."""
    _check_pairs(preds, refs, "exact_match")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs, strict=True))
    return hits / len(refs)


def mean_rouge_l_normalized(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F of the `normalize_answer` forms (case-insensitive; punctuation kept)."""
    _check_pairs(preds, refs, "mean_rouge_l_normalized")
    return mean_rouge_l([normalize_answer(p) for p in preds], [normalize_answer(r) for r in refs])


def perplexity(mean_loss: float) -> float:
    """Perplexity ``exp(mean_loss)`` of a mean token cross-entropy in nats.

    Returns ``inf`` when the loss is too large for a float; raises ValueError for a negative
    or NaN loss, which no cross-entropy can produce.
    """
    if math.isnan(mean_loss) or mean_loss < 0:
        raise ValueError(f"mean_loss must be a non-negative number of nats, got {mean_loss}.")
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
