"""SPEC §8 metrics against confusion matrices computed by hand."""

import math

import numpy as np

from popnet_tf import metrics


def test_confusion_matrix_skips_ignore():
    labels = np.array([[0, 1, 2, 255]])
    preds = np.array([[0, 2, 2, 1]])
    cm = metrics.ConfusionMatrix(3)
    cm.update(labels, preds)
    cm.update(labels, preds)
    np.testing.assert_array_equal(cm.result(), [[2, 0, 0], [0, 0, 2], [0, 0, 2]])


def test_batch_confusion_matrix_is_one_histogram_with_confusion_matrix_counts():
    """k-way evaluation counts two matrices per (query, support) pair at the label's full
    resolution: one bincount, not tf.math.confusion_matrix's boolean-mask copies and
    scatter (7-8x slower; two thirds of a k-way evaluation's time). Same counts, same
    error for a value outside [0, C)."""
    import collections

    import pytest
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for num_classes, shape in ((2, (0,)), (12, (2, 37, 23)), (12, (600, 400))):
        labels = rng.integers(0, num_classes, shape)
        labels[rng.random(shape) < 0.2] = 255
        preds = rng.integers(0, num_classes, shape)
        valid = labels != 255
        expected = tf.math.confusion_matrix(labels[valid], preds[valid], num_classes,
                                            dtype=tf.int64)
        got = metrics.batch_confusion_matrix(labels.astype(np.uint8), preds, num_classes)
        assert got.dtype == tf.int64
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
    for labels, preds in (([[12]], [[0]]), ([[0]], [[12]]), ([[-1]], [[0]])):
        with pytest.raises(tf.errors.InvalidArgumentError):
            metrics.batch_confusion_matrix(labels, preds, 12)
    graph = tf.function(lambda l, p: metrics.batch_confusion_matrix(l, p, 12)).get_concrete_function(
        tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.int32)).graph
    ops = collections.Counter(op.type for op in graph.get_operations())
    assert ops["DenseBincount"] + ops["Bincount"] == 1 and not ops["ScatterNd"] and not ops["Where"], ops


def test_kway_summary_by_hand():
    # rows truth, cols prediction; class 3 absent from truth and prediction.
    m = np.array([[8, 1, 1, 0],
                  [2, 3, 0, 0],
                  [0, 0, 5, 0],
                  [0, 0, 0, 0]])
    s = metrics.kway_summary(m, novel=(2,), class_names=["bg", "a", "b", "c"])
    iou_bg = 8 / (8 + 2 + 2)       # TP / (TP + FP + FN)
    iou_a = 3 / (3 + 1 + 2)
    iou_b = 5 / (5 + 1 + 0)
    assert math.isclose(s["human_miou"], (iou_bg + iou_a + iou_b) / 3)
    assert math.isclose(s["novel_miou"], iou_b)
    assert math.isclose(s["base_miou"], iou_a)         # class 3 has no pixels: left out
    assert math.isclose(s["overall_acc"], 16 / 20)
    assert s["per_class_iou"]["c"] is None


def test_oneway_background_averaging_and_bi_iou():
    # class 1: fg IoU 2/4, bg IoU 5/7; class 2: fg IoU 1/1, bg IoU 3/3.
    m1 = np.array([[5, 1], [1, 2]])
    m2 = np.array([[3, 0], [0, 1]])
    s = metrics.oneway_summary({1: m1, 2: m2}, novel=(2,), num_classes=3)
    bg = (5 / 7 + 3 / 3) / 2
    assert math.isclose(s["per_class_iou"]["0"], bg)
    assert math.isclose(s["human_miou"], (bg + 2 / 4 + 1.0) / 3)
    assert math.isclose(s["novel_miou"], 1.0)
    total = m1 + m2                 # [[8,1],[1,3]]
    assert math.isclose(s["bi_iou"], (8 / 10 + 3 / 5) / 2)


def test_format_table_percent():
    s = {"novel_miou": 0.241, "human_miou": 0.606, "per_class_iou": {"bg": 0.9}}
    table = metrics.format_table(s, "POPNet")
    assert "24.1" in table and "60.6" in table and "| bg | 90.0 |" in table


def test_kway_error_breakdown_by_hand():
    # Truth rows (relabelled as SPEC §5), prediction columns; classes bg, a, b.
    m = np.array([[10, 4, 1],
                  [3, 6, 1],
                  [0, 2, 5]])
    # Of the 4 background-truth pixels predicted a, 3 belong to a class the support
    # lacked (original label b); the other one is true background.
    absent = np.array([[0, 0, 0],
                       [0, 0, 0],
                       [2, 3, 0]])
    parts = metrics.kway_error_breakdown(m, absent, ["bg", "a", "b"])
    union_a = 6 + 3 + 1 + 4 + 2          # TP + FN (bg 3, b 1) + FP (bg 4, b 2)
    expect_a = {"iou": 6, "missed_as_background": 3, "missed_as_other_class": 1,
                "false_from_background": 1, "false_from_absent_class": 3,
                "false_from_other_class": 2}
    for kind, count in expect_a.items():
        assert math.isclose(parts["a"][kind], count / union_a), kind
    union_b = 5 + 2 + 1 + 1
    assert math.isclose(parts["b"]["iou"], 5 / union_b)
    assert math.isclose(parts["b"]["false_from_background"], 1 / union_b)
    assert parts["b"]["false_from_absent_class"] == 0.0
    assert math.isclose(parts["b"]["false_from_other_class"], 1 / union_b)   # a predicted b
    for name in ("a", "b"):                  # the six parts always add up to the union
        assert math.isclose(sum(parts[name].values()), 1.0)
        assert math.isclose(parts[name]["iou"], metrics.per_class_iou(m)[["bg", "a", "b"].index(name)])
    assert "bg" not in parts                 # foreground classes only


def test_kway_error_breakdown_empty_class_and_table():
    m = np.array([[5, 0], [0, 0]])
    parts = metrics.kway_error_breakdown(m, np.zeros((2, 2)), ["bg", "a"])
    assert parts == {"a": None}
    table = metrics.format_error_breakdown(
        metrics.kway_error_breakdown([[1, 1], [1, 1]], [[0, 0], [0, 0]], ["bg", "a"]))
    assert "| a | 33.3 | 33.3 | 0.0 | 33.3 | 0.0 | 0.0 |" in table


def test_human_miou_includes_background_when_it_changes_the_mean():
    # SPEC §8: Human MIoU averages all classes, background included. Here background's
    # IoU (9/10) differs from the foreground mean, so leaving it out shows.
    m = np.array([[9, 1, 0],
                  [0, 1, 1],
                  [0, 0, 2]])
    s = metrics.kway_summary(m, novel=(2,))
    iou_bg, iou_a, iou_b = 9 / 10, 1 / 3, 2 / 3
    assert math.isclose(s["human_miou"], (iou_bg + iou_a + iou_b) / 3)
    assert not math.isclose(s["human_miou"], (iou_a + iou_b) / 2)
