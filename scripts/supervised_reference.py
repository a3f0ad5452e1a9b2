#!/usr/bin/env python
"""A supervised reference for stage 3: what the same network reaches on the base classes
when it is simply trained on them, scored by the same k-way protocol as POPNet.

POPNet's stage 3 learns the base classes only through one-shot episodes. This script
trains an ordinary segmentation network on them instead: the same DeepLab v3+ encoder as
the workdir's config, its weights initialised from the workdir's stage 1 (as stage 2
starts from stage 1's encoder), a 1x1 classifier over the 12 classes, cross-entropy on
q_train ∪ s_train labelled in stage 3's classes with the fold's novel classes as
background (SPEC §4). It is then scored exactly as `evaluate --way kway` scores POPNet
(`eval_lib.evaluate_kway`: every q_test query against the ten fixed supports, logits
restricted to each support's classes, SPEC §5 relabelling, §8 metrics). It cannot find
novel classes; its base MIoU says how far the network itself goes on these images in a
given number of steps. The model is the Fine-tune baseline's (`FineTuneStage`) without
its test-time tuning.

Usage (from the repository root, after the default run):
    python scripts/supervised_reference.py --workdir workdirs/synthetic_cpu_fold1 --steps 1800

Writes `<workdir>/supervised_reference/steps<N>.json` (the §8 summary with the error
breakdown, the steps, batch, crop and training time) and prints the k-way table.
"""

from __future__ import annotations

import json
import os
import time

from typing import TYPE_CHECKING

import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict

# Keras, TensorFlow and the modules that import them only inside the functions that use
# them, after the flags are parsed: --help is instant instead of ~20 s.
from popnet_tf import classes, cli

if TYPE_CHECKING:
    import keras

FLAGS = flags.FLAGS


def _define_flags():
    """Defined when run as a script only, so that tests can import the functions."""
    flags.DEFINE_string("workdir", "workdirs/synthetic_cpu_fold1",
                        "A POPNet workdir with stage 1 trained: its run.json gives the config, "
                        "fold and dataset, its stage 1 the encoder's initial weights.")
    flags.DEFINE_integer("steps", 1800, "Training steps (1800 = stages 2 + 3 of the default).")
    flags.DEFINE_integer("batch_size", 0, "Batch; 0: the config's train.batch_size.")
    flags.DEFINE_integer("max_queries", 0, "Score only this many q_test queries; 0: all.")
    flags.DEFINE_string("out", "", "Result file; default <workdir>/supervised_reference/"
                        "steps<N>.json.")


def load_run_config(workdir: str):
    """The config and fold a workdir was trained with (its run.json)."""
    from popnet_tf import train_lib

    path = os.path.join(workdir, train_lib.RUN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not a POPNet workdir (train stage 1 there first)")
    try:
        with open(path) as f:
            record = json.load(f)
        return ConfigDict(record["config"]), int(record["fold"])
    except (ValueError, KeyError, TypeError) as e:  # json's message names no file
        raise ValueError(f"{path}: damaged or not a run record ({type(e).__name__}: {e})") from None


def build_reference(config, workdir: str) -> keras.Model:
    """The Fine-tune baseline's network for stage 3, its encoder copied from stage 1."""
    import tensorflow as tf

    from popnet_tf import train_lib
    from popnet_tf.models import baselines, popnet

    model = baselines.FineTuneStage(classes.STAGE_NUM_CLASSES[3], popnet.encoder_kwargs(config),
                                    name="supervised_reference")
    side = config.data.crop_size
    model.classifier(model.infused_features(tf.zeros([1, side, side, 3])))  # builds both
    stage1 = train_lib.restore_stage(config, workdir, 1)
    model.encoder.set_weights(stage1.encoder.get_weights())
    return model


def train_reference(model, config, fold: int, steps: int, batch_size: int) -> float:
    """Cross-entropy on stage-3 labels (novel -> background) for `steps` steps with the
    config's optimizer and poly schedule; returns the seconds it took."""
    import keras
    import tensorflow as tf

    from popnet_tf import train_lib
    from popnet_tf.data import episodes

    d = config.data
    data = episodes.supervised_train_dataset(
        d.dir, stage=3, fold=fold, fold_set=d.fold_set, batch_size=batch_size,
        crop_size=train_lib.crop_size(config, 3), scale_range=tuple(d.scale_range),
        resize_long_side=d.resize_long_side or None, seed=config.seed)
    optimizer = train_lib.make_optimizer(config, steps)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                         ignore_class=classes.IGNORE_LABEL)
    variables = model.trainable_variables

    @tf.function
    def step(batch):
        with tf.GradientTape() as tape:
            features = model.infused_features(batch["image"], training=True)
            logits = tf.image.resize(tf.cast(model.classifier(features), tf.float32),
                                     tf.shape(batch["image"])[1:3], method="bilinear")
            loss = loss_fn(batch["mask"], logits)
            # SGD's weight decay is an L2 term of the loss (train_lib.make_optimizer).
            loss_with_decay = loss + train_lib.weight_decay_loss(optimizer, variables)
        optimizer.apply_gradients(zip(tape.gradient(loss_with_decay, variables), variables))
        return loss

    bar = keras.utils.Progbar(steps, unit_name="step")
    start = time.time()
    for i, batch in enumerate(data.take(steps)):
        loss = float(step(batch))
        if not np.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {i + 1}")
        bar.update(i + 1, values=[("loss", loss)])
    return time.time() - start


def run(workdir: str, steps: int, batch_size: int = 0, max_queries: int = 0) -> dict:
    """Trains and scores the reference; returns the k-way summary with the run's facts."""
    import keras

    from popnet_tf import eval_lib, train_lib

    if steps < 1 or batch_size < 0 or max_queries < 0:
        raise ValueError(f"--steps must be >= 1 and --batch_size, --max_queries >= 0; got "
                         f"{steps}, {batch_size}, {max_queries}")
    config, fold = load_run_config(workdir)
    train_lib._configure_runtime(config)  # noqa: SLF001 - the run's precision policy
    keras.utils.set_random_seed(config.seed)
    batch_size = batch_size or config.train.batch_size
    model = build_reference(config, workdir)
    seconds = train_reference(model, config, fold, steps, batch_size)
    summary = eval_lib.evaluate_kway(model, data_dir=config.data.dir, stage=3, fold=fold,
                                     fold_set=config.data.fold_set,
                                     eval_size=config.data.eval_size, head="model",
                                     max_queries=max_queries or None)
    summary.update({"method": "supervised reference (stage-1 encoder, base classes)",
                    "steps": steps, "batch_size": batch_size,
                    "crop_size": train_lib.crop_size(config, 3),
                    "train_seconds": round(seconds, 1), "fold": fold})
    return summary


def check_out(out: str) -> None:
    """Refuses a result path that cannot be written, before the training: a folder at
    --out used to end the run in an IsADirectoryError traceback after it."""
    from popnet_tf import integrity

    if os.path.isdir(out):
        raise IsADirectoryError(f"--out={out}: is a folder; give a file name (.json)")
    integrity.check_workdir(os.path.dirname(os.path.abspath(out)))


def main(argv):
    del argv
    from popnet_tf import metrics, train_lib

    out = FLAGS.out or os.path.join(FLAGS.workdir, "supervised_reference",
                                    f"steps{FLAGS.steps}.json")
    try:
        if not FLAGS.out:  # the default lives in the workdir: no folder made for a wrong one
            load_run_config(FLAGS.workdir)
        check_out(out)
        summary = run(FLAGS.workdir, FLAGS.steps, FLAGS.batch_size, FLAGS.max_queries)
    except (OSError, ValueError) as e:  # not a workdir, no stage 1, bad counts, bad --out
        raise SystemExit(f"FATAL {type(e).__name__}: {e}") from None
    train_lib.write_json_atomic(out, summary)
    print(metrics.format_table(summary, f"Supervised reference, {FLAGS.steps} steps "
                                        f"({summary['num_pairs']} pairs)"))
    logging.info("Wrote %s (training %.0f s).", out, summary["train_seconds"])


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
