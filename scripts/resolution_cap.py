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

import numpy as np
import tensorflow as tf
from absl import app, flags

from popnet_tf import classes, cli
from popnet_tf.data import episodes

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
    """The Markdown table `main` prints: per grid, IoU % per class, base and novel MIoU."""
    names = classes.MERGED_NAMES
    base, novel = classes.base_ids(3, fold), classes.novel_ids(3, fold)
    lines = ["| grid | " + " | ".join(names) + " | base MIoU | novel MIoU |",
             "|---" * (len(names) + 3) + "|"]
    for stride, cm in confusions.items():
        iou = np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)
        lines.append(f"| 1/{stride} | " + " | ".join(f"{100 * v:.1f}" for v in iou)
                     + f" | {100 * iou[list(base)].mean():.1f} | {100 * iou[list(novel)].mean():.1f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    strides = [int(s) for s in FLAGS.strides]
    print(cap_table(cap_confusions(FLAGS.data, FLAGS.eval_size, strides), FLAGS.fold))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
