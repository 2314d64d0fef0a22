import math

import numpy as np
import pytest

from eval import METRIC_KEYS, metrics


def reference(preds, labels):
    """The MMSA conventions written out a second way, clip by clip."""
    n = len(labels)

    def acc(pairs):
        return sum(p == t for p, t in pairs) / len(pairs)

    def weighted_f1(pairs):  # sklearn's average='weighted', labels as truth
        total = 0.0
        for c in {t for _, t in pairs}:
            tp = sum(p == c and t == c for p, t in pairs)
            pred_c, true_c = sum(p == c for p, _ in pairs), sum(t == c for _, t in pairs)
            precision = tp / pred_c if pred_c else 0.0
            recall = tp / true_c
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            total += f1 * true_c / len(pairs)
        return total

    def clipped_round(x, b):
        return round(min(max(x, -b), b))  # Python's round: half to even, like np.round

    mp, ml = sum(preds) / n, sum(labels) / n
    cov = sum((p - mp) * (t - ml) for p, t in zip(preds, labels))
    corr = cov / math.sqrt(sum((p - mp) ** 2 for p in preds) * sum((t - ml) ** 2 for t in labels))
    has0 = [(p >= 0, t >= 0) for p, t in zip(preds, labels)]
    non0 = [(p > 0, t > 0) for p, t in zip(preds, labels) if t != 0]
    return dict(MAE=sum(abs(p - t) for p, t in zip(preds, labels)) / n, Corr=corr,
                Acc2_has0=acc(has0), F1_has0=weighted_f1(has0), Acc2_non0=acc(non0), F1_non0=weighted_f1(non0),
                Acc5=acc([(clipped_round(p, 2), clipped_round(t, 2)) for p, t in zip(preds, labels)]),
                Acc7=acc([(clipped_round(p, 3), clipped_round(t, 3)) for p, t in zip(preds, labels)]))


def test_hand_checked_rounding_and_zero_labels():
    m = metrics([0.5, -0.5, 2.5, -1.5], [0.0, -1.0, 3.0, -2.0])
    assert m["MAE"] == 0.5
    # round half to even: 0.5 -> 0 (= 0), -0.5 -> -0 (!= -1), 2.5 -> 2 (!= 3), -1.5 -> -2 (= -2)
    assert m["Acc7"] == 0.5
    assert m["Acc5"] == 0.75  # 2.5 and 3 are both clipped to 2: a hit; -0.5 still misses
    assert m["Acc2_has0"] == 1.0 and m["F1_has0"] == 1.0
    assert m["Acc2_non0"] == 1.0  # the label-0 clip is dropped: three clips, all right


def test_hand_checked_weighted_f1():
    # has0 truth [T, T, T, F], preds [T, F, T, T]: F1(T) = 2*2 / (2*2 + 1 + 1) = 2/3, F1(F) = 0; weights 3/4, 1/4
    m = metrics([1.0, -1.0, 2.0, 1.0], [1.0, 2.0, 3.0, -1.0])
    assert m["Acc2_has0"] == 0.5
    assert m["F1_has0"] == pytest.approx(0.5)
    # zero labels: non0 and has0 differ; truth 0 is non-negative but not positive
    m = metrics([-0.1, 0.2, 0.3], [0.0, 0.0, 1.0])
    assert m["Acc2_has0"] == pytest.approx(2 / 3) and m["Acc2_non0"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_an_independent_implementation(seed):
    rng = np.random.default_rng(seed)
    labels = np.round(rng.uniform(-3, 3, 200) * 5) / 5  # MOSI-like steps, many exact zeros and ties
    labels[:20] = 0.0
    preds = np.concatenate([np.round(rng.normal(0, 2, 150) * 2) / 2, rng.normal(0, 2, 50)])  # halves: ties
    ours, ref = metrics(preds, labels), reference(preds.tolist(), labels.tolist())
    assert set(ours) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


def test_constant_predictions_have_no_correlation():
    m = metrics([0.3, 0.3, 0.3], [1.0, -1.0, 2.0])
    assert math.isnan(m["Corr"]) and m["MAE"] == pytest.approx((0.7 + 1.3 + 1.7) / 3)
