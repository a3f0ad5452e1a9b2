"""TensorBoard: what `tensorboard --logdir W/tensorboard` shows after a smoke training,
read back with TensorBoard's own event reader.

Trains the smoke config up to stage 2 once (stage 3 logs through the same code as
stage 2 and would double the time): stage 1 logs the supervised scalars, stage 2 the
dual-metric ones, the validation MIoUs and the episode images.
"""

import glob
import logging
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from absl import logging as absl_logging
from tensorboard.backend.event_processing import event_accumulator

from configs import synthetic_cpu
from popnet_tf import train_lib

pytestmark = pytest.mark.slow

ONESHOT_SCALARS = ("train/loss", "train/agm_loss", "train/ncm_loss", "train/beta",
                   "train/learning_rate", "val/novel_miou", "val/base_miou", "val/human_miou",
                   "val/overall_acc")
STAGE1_SCALARS = ("train/loss", "train/beta", "train/learning_rate", "val/foreground_iou",
                  "val/overall_acc")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tensorboard")
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = str(tmp / "data")
    workdir = str(tmp / "work")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    absl_logger, level = logging.getLogger("absl"), absl_logging.get_verbosity()
    absl_logger.addHandler(handler)
    absl_logging.set_verbosity(absl_logging.INFO)  # the console's level under the CLI
    try:
        train_lib.train(config, workdir, stage=2, fold=1)
    finally:
        absl_logger.removeHandler(handler)
        absl_logging.set_verbosity(level)
    readers = {}
    for stage in (1, 2):
        path = os.path.join(workdir, "tensorboard", f"stage{stage}")
        assert glob.glob(os.path.join(path, "events.out.tfevents.*")), path
        reader = event_accumulator.EventAccumulator(
            path, size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE})
        readers[stage] = reader.Reload()
    return config, readers, lines


def series(reader, tag):
    """(steps, values) of a TF2 scalar summary (stored as a tensor event)."""
    events = reader.Tensors(tag)
    return (np.array([e.step for e in events]),
            np.array([float(tf.make_ndarray(e.tensor_proto)) for e in events]))


def plugin(reader, tag):
    return reader.SummaryMetadata(tag).plugin_data.plugin_name


def test_logdir_holds_one_run_per_stage(run):
    config, readers, _ = run
    assert sorted(readers) == [1, 2]


@pytest.mark.parametrize("stage, tags", [(1, STAGE1_SCALARS), (2, ONESHOT_SCALARS)])
def test_scalar_tags_shown_by_the_scalars_plugin(run, stage, tags):
    _, readers, _ = run
    reader = readers[stage]
    present = set(reader.Tags()["tensors"])
    assert set(tags) <= present, sorted(set(tags) - present)
    for tag in tags:
        assert plugin(reader, tag) == "scalars", tag
        _, values = series(reader, tag)
        assert np.all(np.isfinite(values)), tag


def test_training_scalars_follow_the_schedules(run):
    """Every step logged; loss = β·AGM + (1 − β)·NCM (Eq. 5); β = 1 − epoch/epochs
    (weight shifting); learning rate on the poly schedule."""
    config, readers, _ = run
    t = config.train
    reader = readers[2]
    total = t.epochs * t.steps_per_epoch
    steps, loss = series(reader, "train/loss")
    np.testing.assert_array_equal(steps, np.arange(0, total, t.log_every))
    _, agm = series(reader, "train/agm_loss")
    _, ncm = series(reader, "train/ncm_loss")
    _, beta = series(reader, "train/beta")
    _, lr = series(reader, "train/learning_rate")
    assert np.all(loss > 0) and np.all(agm > 0) and np.all(ncm > 0)
    np.testing.assert_allclose(beta, 1.0 - (steps // t.steps_per_epoch) / t.epochs)
    np.testing.assert_allclose(loss, beta * agm + (1 - beta) * ncm, rtol=1e-5)

    def poly(k):
        return t.learning_rate * (1 - np.minimum(k, total) / total) ** t.poly_power

    # The rate of the step logged, or the one after it (logged once the optimizer has
    # stepped): either way the poly schedule, decreasing from the configured rate.
    assert (np.allclose(lr, poly(steps), rtol=1e-5) or np.allclose(lr, poly(steps + 1), rtol=1e-5)), lr


def test_validation_scalars_per_epoch(run):
    config, readers, _ = run
    for stage, tags in ((1, ("val/foreground_iou", "val/overall_acc")),
                        (2, ("val/novel_miou", "val/base_miou", "val/human_miou", "val/overall_acc"))):
        epochs = config.train.stage1_epochs if stage == 1 else config.train.epochs
        for tag in tags:
            steps, values = series(readers[stage], tag)
            np.testing.assert_array_equal(steps, np.arange(1, epochs + 1))  # one per epoch
            assert np.all((values >= 0) & (values <= 1)), (tag, values)


def test_validation_printed_on_the_console(run):
    """Each epoch's validation is also a console line, with the figures TensorBoard got."""
    config, readers, console = run
    for stage, keys in ((1, (("foreground IoU", "val/foreground_iou"),
                             ("overall acc", "val/overall_acc"))),
                        (2, (("base MIoU", "val/base_miou"), ("novel MIoU", "val/novel_miou"),
                             ("human MIoU", "val/human_miou"), ("overall acc", "val/overall_acc")))):
        epochs = config.train.stage1_epochs if stage == 1 else config.train.epochs
        printed = [l for l in console
                   if l.startswith(f"Stage {stage} epoch ") and " validation: " in l]
        assert len(printed) == epochs, console
        for epoch, line in enumerate(printed):
            assert line.startswith(f"Stage {stage} epoch {epoch + 1}/{epochs} validation: ")
            assert line.endswith(" pairs)" if stage > 1 else " images)"), line
            for label, tag in keys:
                value = float(re.search(rf"{label} (\d\.\d{{3}})", line).group(1))
                assert value == round(series(readers[stage], tag)[1][epoch], 3), (line, tag)


def test_validation_line_formats():
    line = train_lib.validation_line({"base_miou": 0.5, "novel_miou": None, "human_miou": 0.25,
                                      "overall_acc": float("nan"), "num_pairs": 50})
    assert line == "base MIoU 0.500, human MIoU 0.250 (50 pairs)"


def test_episode_images(run):
    """val/episodes: per validation, PNG rows of 4 tiles (support + mask | query |
    truth | prediction), each eval_size square, as the images plugin reads them."""
    config, readers, _ = run
    reader = readers[2]
    assert "val/episodes" in reader.Tags()["tensors"]
    assert plugin(reader, "val/episodes") == "images"
    events = reader.Tensors("val/episodes")
    assert [e.step for e in events] == list(range(1, config.train.epochs + 1))
    size = config.data.eval_size
    for event in events:
        # The image summary format: [width, height, png, png, ...] as strings.
        data = tf.make_ndarray(event.tensor_proto)
        width, height = int(data[0]), int(data[1])
        assert (width, height) == (4 * size, size)
        # One example per validation query (each against another support), at most
        # num_logged_examples.
        expected = min(config.eval.num_logged_examples, config.eval.val_queries)
        assert len(data) - 2 == expected
        for png in data[2:]:
            image = tf.io.decode_png(png).numpy()
            assert image.shape == (height, width, 3)
            assert image.std() > 0  # not a blank tile row
