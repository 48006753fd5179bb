"""Tests for silotune.eval.metrics against values computed by hand."""

import math

import pytest

from silotune.eval.metrics import accuracy, macro_f1, mean_rouge_l, perplexity, rouge_l

PREDS = ["a", "a", "b", "c", "a"]
GOLDS = ["a", "b", "b", "b", "c"]


def test_accuracy_counts_exact_matches():
    assert accuracy(PREDS, GOLDS) == pytest.approx(2 / 5)
    assert accuracy(["x"], ["x"]) == 1.0


def test_macro_f1_hand_computed():
    # F1 = 2TP / (2TP + FP + FN)
    # a: tp1 fp2 fn0 -> 2/4 ; b: tp1 fp0 fn2 -> 2/4 ; c: tp0 fp1 fn1 -> 0
    assert macro_f1(PREDS, GOLDS) == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_macro_f1_excludes_classes_without_support_or_prediction():
    # "zzz" is listed but neither gold nor predicted: left out (else the mean would be 0.25)
    assert macro_f1(PREDS, GOLDS, labels=["a", "b", "c", "zzz"]) == pytest.approx(1 / 3)


def test_macro_f1_counts_predicted_only_class_as_zero():
    # b: tp0 fp1 fn0 -> 0 ; a: tp1 fp0 fn1 -> 2/3
    assert macro_f1(["a", "b"], ["a", "a"]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_macro_f1_with_labels_ignores_out_of_list_predictions_as_classes():
    # "junk" is not a class, but it still costs "a" a false negative: a: tp1 fp0 fn1 -> 2/3
    assert macro_f1(["a", "junk"], ["a", "a"], labels=["a"]) == pytest.approx(2 / 3)


def test_perfect_predictions_score_one():
    assert macro_f1(GOLDS, GOLDS) == 1.0
    assert accuracy(GOLDS, GOLDS) == 1.0


@pytest.mark.parametrize("metric", [accuracy, macro_f1, mean_rouge_l])
def test_length_mismatch_and_empty_inputs_raise(metric):
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metric([], [])


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat was on the mat") = the cat on the mat = 5
    # P = 5/6, R = 5/6 -> F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    # LCS("a b c d", "a c") = 2: P = 2/4, R = 2/2 -> F = 2 * 0.5 * 1 / 1.5 = 2/3
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    # order matters: LCS("c b a", "a b c") = 1 -> P = R = 1/3
    assert rouge_l("c b a", "a b c") == pytest.approx(1 / 3)


def test_rouge_l_edge_cases():
    assert rouge_l("same  words\nhere", "same words here") == 1.0  # whitespace tokens
    assert rouge_l("Cat", "cat") == 0.0  # case-sensitive
    assert rouge_l("", "cat") == 0.0
    assert rouge_l("cat", "   ") == 0.0
    assert rouge_l("", "") == 0.0


def test_mean_rouge_l_averages_pairs():
    assert mean_rouge_l(["a b c d", "x"], ["a c", "x"]) == pytest.approx((2 / 3 + 1.0) / 2)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(42.0)) == pytest.approx(42.0)
    assert perplexity(1000.0) == math.inf
    with pytest.raises(ValueError, match="non-negative"):
        perplexity(-0.5)
    with pytest.raises(ValueError, match="non-negative"):
        perplexity(float("nan"))
