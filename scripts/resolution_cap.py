#!/usr/bin/env python
"""How much IoU the feature grid alone allows: the ceiling a perfect model reaches.

The stages classify features at 1/4 of the input (SPEC §6) and are scored at each label's
own resolution (§8). This script takes every q_test label, averages its one-hot classes
down to a feature grid (area resize), brings them back to the label's size (bilinear, as
the models upsample their logits) and takes the argmax: the IoU that a model predicting
every feature cell perfectly would get. Thin or small classes (hair, shoes, arms) lose
most.

Usage (from the repository root):
    python scripts/resolution_cap.py --data tfrecords/synthetic --eval_size 144
    python scripts/resolution_cap.py --data tfrecords/synthetic --eval_size 144 --strides 2,4,8

Prints, per grid (`eval_size / stride` rows), stage-3 IoU per class and the base and novel
MIoU of `--fold` (SPEC §8: base and novel over the foreground classes).
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

# TensorFlow (and metrics, episodes, which import it) only inside the functions that use
# it, after the flags are parsed: --help is instant instead of ~20 s.
from popnet_tf import classes, cli

FLAGS = flags.FLAGS


def _define_flags():
    """Defined when run as a script only, so that tests can import the functions."""
    flags.DEFINE_string("data", "tfrecords/synthetic", "Built ATR-OS dataset folder (its q_test).")
    flags.DEFINE_integer("eval_size", 144, "Long side the images are resized to for the model "
                         "(configs: data.eval_size).")
    flags.DEFINE_list("strides", ["1", "2", "4"], "Feature strides to score (4: the models' grid).")
    flags.DEFINE_integer("fold", 1, "Fold, 1 or 2, whose novel classes are reported apart "
                         "(SPEC §4).")


def cap_confusions(data_dir: str, eval_size: int, strides) -> dict[int, np.ndarray]:
    """{stride: [C, C] confusion matrix of the perfect grid-limited prediction}."""
    import tensorflow as tf

    from popnet_tf.data import episodes

    num = classes.STAGE_NUM_CLASSES[3]
    confusions = {s: np.zeros((num, num), np.int64) for s in strides}
    for query in episodes.test_queries(data_dir, stage=3, eval_size=eval_size):
        label = query["label"].numpy()
        height, width = label.shape
        valid = label != classes.IGNORE_LABEL
        one_hot = tf.one_hot(np.where(valid, label, 0), num)[None]
        scale = eval_size / max(height, width)  # the image's size inside the eval square
        for stride in strides:
            grid = (max(1, round(height * scale / stride)), max(1, round(width * scale / stride)))
            cells = tf.image.resize(one_hot, grid, method="area")
            pred = tf.argmax(tf.image.resize(cells, (height, width), method="bilinear")[0], -1)
            np.add.at(confusions[stride], (label[valid], pred.numpy()[valid]), 1)
    return confusions


def cap_table(confusions: dict[int, np.ndarray], fold: int) -> str:
    """The Markdown table `main` prints: per grid, IoU % per class, base and novel MIoU.

    As in SPEC §8 (`metrics.kway_summary`), a class absent from the labels is n/a and
    left out of the means; it used to count as IoU 0 and pull them down."""
    from popnet_tf import metrics

    names = classes.MERGED_NAMES
    base, novel = classes.base_ids(3, fold), classes.novel_ids(3, fold)
    lines = ["| grid | " + " | ".join(names) + " | base MIoU | novel MIoU |",
             "|---" * (len(names) + 3) + "|"]
    for stride, cm in confusions.items():
        iou = metrics.per_class_iou(cm)
        means = [_mean(iou[list(ids)]) for ids in (base, novel)]
        lines.append(f"| 1/{stride} | " + " | ".join(_percent(v) for v in [*iou, *means]) + " |")
    return "\n".join(lines)


def _mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _percent(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{100 * value:.1f}"


def check_flags(data: str, eval_size: int, strides: list[str], fold: int) -> list[int]:
    """The strides as integers; a bad flag is one ValueError naming it, before the
    q_test pass (a bad --fold used to fail after it, with a traceback)."""
    try:
        values = [int(s) for s in strides]
    except ValueError:
        raise ValueError(f"--strides={','.join(strides)}: integers >= 1, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise ValueError(f"--strides={','.join(strides)}: integers >= 1, e.g. 1,2,4")
    if eval_size < 1:
        raise ValueError(f"--eval_size={eval_size}: must be >= 1")
    if fold not in classes.FOLDS[classes.DEFAULT_FOLD_SET]:
        raise ValueError(f"--fold={fold}: choose one of {sorted(classes.FOLDS[classes.DEFAULT_FOLD_SET])}")
    if not os.path.isdir(data):
        raise FileNotFoundError(f"--data={data}: no such folder (a built ATR-OS dataset)")
    return values


def main(argv):
    del argv
    try:
        strides = check_flags(FLAGS.data, FLAGS.eval_size, FLAGS.strides, FLAGS.fold)
        confusions = cap_confusions(FLAGS.data, FLAGS.eval_size, strides)
    except (OSError, ValueError) as e:  # a missing or damaged dataset too: one line
        raise SystemExit(f"FATAL {type(e).__name__}: {e}") from None
    print(cap_table(confusions, FLAGS.fold))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
