"""Tests of popnet_tf/data/show.py: colours, panels, the grid and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from popnet_tf import classes
from popnet_tf.data import show
from tests.test_episodes import dataset  # noqa: F401  (the module-scoped TFRecord fixture)


def test_palette_covers_every_stage():
    assert show.PALETTE.shape == (classes.NUM_CLASSES, 3)
    assert len({tuple(c) for c in show.PALETTE}) == classes.NUM_CLASSES  # distinct colours
    assert tuple(show.PALETTE[0]) == (0, 0, 0)


def test_colourise_and_overlay():
    mask = np.array([[0, 3], [255, 7]])
    colours = show.colourise(mask)
    assert colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[0, 1], show.PALETTE[3])
    np.testing.assert_array_equal(colours[1, 0], show.IGNORE_COLOUR)
    image = np.full((2, 2, 3), 100.0, np.float32)
    out = show.overlay(image, mask, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])       # background untouched
    np.testing.assert_array_equal(out[1, 0], [100, 100, 100])       # ignore untouched
    np.testing.assert_array_equal(out[0, 1], np.round((100 + show.PALETTE[3].astype(float)) / 2))


def test_episode_panel_layout():
    size = 8
    rng = np.random.default_rng(0)
    episode = {"support_image": rng.uniform(0, 255, (size, size, 3)).astype(np.float32),
               "query_image": rng.uniform(0, 255, (size, size, 3)).astype(np.float32),
               "support_mask": rng.integers(0, 5, (size, size)),
               "query_mask": rng.integers(0, 5, (size, size))}
    panel = show.episode_panel(episode, stage=2)
    assert panel.shape == (size, 3 * size, 3) and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[:, size:2 * size], np.round(episode["query_image"]))
    np.testing.assert_array_equal(panel[:, 2 * size:], show.PALETTE[episode["query_mask"]])


def test_episode_panel_of_an_evaluation_example():
    # truth / prediction at label resolution (4 x 2) are put in the 8 x 8 frame
    truth = np.array([[1, 2], [1, 2], [3, 3], [0, 0]])
    example = {"support_image": np.zeros((8, 8, 3)), "support_mask": np.zeros((8, 8), int),
               "query_image": np.zeros((8, 8, 3)), "truth": truth, "prediction": truth,
               "valid_size": np.array([8, 4])}
    panel = show.episode_panel(example, stage=3)
    assert panel.shape == (8, 32, 3)
    expected = np.full((8, 8), 255)
    expected[:, :4] = np.repeat(np.repeat(truth, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(panel[:, 16:24], show.colourise(expected))
    np.testing.assert_array_equal(panel[:, 24:], show.colourise(expected))


@pytest.mark.parametrize("split, way", [("q_train", "kway"), ("s_train", "oneway"), ("q_test", "kway"),
                                        ("s_test", "oneway")])
def test_grid_from_the_dataset(dataset, split, way):  # noqa: F811
    rows, captions = show.load_episodes(dataset["dir"], split=split, stage=3, fold=1, fold_set="paper",
                                        way=way, num=2, seed=0, crop_size=24, eval_size=24,
                                        resize_long_side=None)
    assert len(rows) == len(captions) == 2
    grid = show.render_grid(rows, 3, captions)
    assert grid.size[0] == 3 * 24 and grid.size[1] > 2 * 24
    pixels = np.asarray(grid).reshape(-1, 3)
    # the legend swatches are drawn: every class colour occurs somewhere
    for colour in show.PALETTE[1:]:
        assert np.any(np.all(pixels == colour, axis=1)), colour


def test_cli_writes_a_png(dataset, tmp_path):  # noqa: F811
    out = tmp_path / "grid.png"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-m", "popnet_tf.data.show", "--data", dataset["dir"], "--split", "q_test",
                    "--stage", "2", "--fold", "1", "--num", "3", "--eval_size", "32", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=120)
    image = Image.open(out)
    assert image.mode == "RGB" and image.size[0] == 3 * 32


@pytest.mark.parametrize("args, message", [
    (["--data", "{raw}"], "FATAL FileNotFoundError: {raw}/manifest.json: no manifest; {raw} is an "
                          "ATR-layout folder, not a built ATR-OS dataset. Build one from it with "
                          "`python -m popnet_tf.data.build_atr_os --atr_root {raw} --out "
                          "{raw}_atr_os`"),
    (["--stage", "4"], "FATAL ValueError: --stage must be 1, 2 or 3, got 4"),
    (["--fold", "3"], "FATAL ValueError: fold must be one of [1, 2], got 3"),
    (["--num", "0"], "FATAL ValueError: --num must be at least 1, got 0"),
    (["--out", "{tmp}/missing/grid.png"], "FATAL FileNotFoundError: [Errno 2] No such file or "
                                          "directory: '{tmp}/missing/grid.png'"),
])
def test_cli_mistakes_end_in_one_line(dataset, tmp_path, args, message):  # noqa: F811
    """An ATR folder given as --data (not yet built), a stage or fold that does not exist,
    --num 0 or --out in a missing folder ended in a Python traceback."""
    raw = tmp_path / "ATR"
    (raw / "JPEGImages").mkdir(parents=True)
    fill = {"raw": str(raw), "tmp": str(tmp_path)}
    argv = ["--data", dataset["dir"], "--split", "q_test", "--eval_size", "32",
            "--out", str(tmp_path / "grid.png")] + [a.format(**fill) for a in args]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-m", "popnet_tf.data.show"] + argv, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message.format(**fill)), done.stderr


@pytest.mark.parametrize("change, message", [
    ({"eval_size": 0}, "--eval_size must be at least 1"),          # tf.data traceback
    ({"resize_long_side": -3}, "--resize_long_side must be >= 0"),  # silently no resize
    ({"out": "DIR"}, "is a folder"),                                # "unknown file extension: "
    ({"out": "grid.foo"}, r"\.foo is not an image format"),        # Pillow's, after the work
    ({"out": "grid"}, "no extension is not an image format"),
    ({"stage": 4}, "--stage must be 1, 2 or 3")])
def test_flag_values_checked_before_reading(tmp_path, change, message):
    import types

    values = {"stage": 3, "num": 4, "eval_size": 512, "resize_long_side": 0,
              "out": str(tmp_path / "grid.png")}
    good = types.SimpleNamespace(**values)
    values.update({k: str(tmp_path) if v == "DIR" else v for k, v in change.items()})
    with pytest.raises(ValueError, match=message):
        show.check_flags(types.SimpleNamespace(**values))
    show.check_flags(good)
