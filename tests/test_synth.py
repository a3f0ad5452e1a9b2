"""Tests of the synthetic ATR-format generator (popnet_tf/data/synth.py).

Expected values are computed here from the written files with NumPy/PIL, or
written down from the issue (label ids from classes.RAW_ATR_NAMES by name).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from popnet_tf import classes
from popnet_tf.data import synth

RAW = {name: i for i, name in enumerate(classes.RAW_ATR_NAMES)}
SEED = 3
NUM_FILES = 24
NUM_DRAWS = 200
ALLOWED_SIZES = {(400, 600), (300, 450), (480, 640), (512, 512), (600, 800), (640, 480)}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A small dataset written through the public API: (root, ids)."""
    root = str(tmp_path_factory.mktemp("synth_a"))
    ids = synth.generate(root, NUM_FILES, SEED, progress=False)
    return root, ids


@pytest.fixture(scope="module")
def small_masks():
    """NUM_DRAWS small masks, drawn as generate() does (rng per (seed, i))."""
    masks = []
    for i in range(NUM_DRAWS):
        _, mask = synth.draw_person(np.random.default_rng([7, i]), 240, 160)
        masks.append(mask)
    return masks


def _read(root, image_id):
    image = Image.open(os.path.join(root, "JPEGImages", image_id + ".jpg"))
    mask = Image.open(os.path.join(root, "SegmentationClassAug", image_id + ".png"))
    return image, mask


def _file_bytes(root, image_id):
    out = []
    for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClassAug", ".png")):
        with open(os.path.join(root, sub, image_id + ext), "rb") as f:
            out.append(f.read())
    return out


def test_layout_and_file_formats(written):
    root, ids = written
    assert ids == [f"synth_{i:06d}" for i in range(NUM_FILES)]
    # Exactly the expected files: no temp file or anything else left behind.
    assert sorted(os.listdir(os.path.join(root, "JPEGImages"))) == [i + ".jpg" for i in ids]
    assert sorted(os.listdir(os.path.join(root, "SegmentationClassAug"))) == [i + ".png" for i in ids]
    sizes = []
    for image_id in ids:
        image, mask = _read(root, image_id)
        assert image.format == "JPEG" and image.mode == "RGB"
        assert mask.format == "PNG" and mask.mode == "L"
        assert image.size == mask.size
        assert image.size in ALLOWED_SIZES
        sizes.append(image.size)
    # Mostly ATR's 400x600 portrait (about 80 %), but not only.
    assert sizes.count((400, 600)) >= NUM_FILES // 2


def test_label_values_are_raw_atr_ids(written):
    root, ids = written
    for image_id in ids:
        mask = np.asarray(_read(root, image_id)[1])
        assert mask.dtype == np.uint8
        assert mask.max() <= 17
        assert (mask == 0).mean() > 0.2  # there is background around the person


def test_every_raw_label_occurs(small_masks):
    seen = set()
    for mask in small_masks:
        seen.update(np.unique(mask).tolist())
    assert set(range(1, 18)) <= seen, f"missing raw ids {sorted(set(range(1, 18)) - seen)}"
    # Each image has a face, upper body clothing and shoes.
    for mask in small_masks:
        present = set(np.unique(mask).tolist())
        assert RAW["face"] in present
        assert present & {RAW["upper-clothes"], RAW["dress"]}
        assert present & {RAW["left-shoe"], RAW["right-shoe"]}


@pytest.mark.parametrize("left,right", [("left-arm", "right-arm"), ("left-leg", "right-leg"),
                                        ("left-shoe", "right-shoe")])
def test_left_right_from_the_persons_view(small_masks, left, right):
    # The person faces the camera: their LEFT parts are on the IMAGE's right.
    votes = []
    for mask in small_masks:
        cols_l = np.nonzero(mask == RAW[left])[1]
        cols_r = np.nonzero(mask == RAW[right])[1]
        if cols_l.size and cols_r.size:
            votes.append(cols_l.mean() > cols_r.mean())
    assert len(votes) > NUM_DRAWS // 2
    assert np.mean(votes) >= 0.9, (left, right, np.mean(votes))


def test_person_height_fraction(written, small_masks):
    masks = [np.asarray(_read(written[0], i)[1]) for i in written[1]] + small_masks
    fractions = []
    for mask in masks:
        rows = np.nonzero((mask > 0).any(axis=1))[0]
        fractions.append((rows[-1] - rows[0] + 1) / mask.shape[0])
    fractions = np.array(fractions)
    assert fractions.min() >= 0.5 and fractions.max() <= 0.95, (fractions.min(), fractions.max())
    assert fractions.max() - fractions.min() > 0.25  # the scale varies


def test_same_seed_gives_identical_bytes(written, tmp_path):
    root, ids = written
    synth.generate(str(tmp_path / "b"), 4, SEED, progress=False)
    for image_id in ids[:4]:
        assert _file_bytes(str(tmp_path / "b"), image_id) == _file_bytes(root, image_id)
    # Image i depends only on (seed, i): a run that starts later matches too.
    later = synth.generate(str(tmp_path / "c"), 3, SEED, start_index=5, progress=False)
    assert later == ids[5:8]
    for image_id in later:
        assert _file_bytes(str(tmp_path / "c"), image_id) == _file_bytes(root, image_id)


def test_different_seeds_differ(written, tmp_path):
    root, ids = written
    synth.generate(str(tmp_path / "d"), 4, SEED + 1, progress=False)
    for image_id in ids[:4]:
        jpg_a, png_a = _file_bytes(root, image_id)
        jpg_b, png_b = _file_bytes(str(tmp_path / "d"), image_id)
        assert jpg_a != jpg_b and png_a != png_b


def _boundary_ratios(image, mask):
    """At horizontal label boundaries with 2-pixel runs on each side
    (labels a a | b b), |I[x+1] - I[x]| / |I[x+2] - I[x-1]|: about 1 for a
    hard edge, about 1/3 for an edge softened over 3 pixels."""
    img = image.astype(np.float32)
    m = mask
    a0, a1, b0, b1 = m[:, :-3], m[:, 1:-2], m[:, 2:-1], m[:, 3:]
    ys, xs = np.nonzero((a0 == a1) & (b0 == b1) & (a1 != b0))
    xs = xs + 1  # column of the last pixel of the left run
    step = np.abs(img[ys, xs + 1] - img[ys, xs]).sum(axis=1)
    full = np.abs(img[ys, xs + 2] - img[ys, xs - 1]).sum(axis=1)
    strong = full > 90
    return step[strong] / full[strong]


def test_image_is_antialiased_and_mask_is_not():
    for i in range(4):
        image, mask = synth.draw_person(np.random.default_rng([11, i]), 600, 400)
        assert image.shape == (600, 400, 3) and image.dtype == np.uint8
        assert mask.shape == (600, 400) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= set(range(18))
        # Image: colours at label boundaries are intermediate.
        ratios = _boundary_ratios(image, mask)
        assert ratios.size > 50
        assert np.median(ratios) < 0.6, np.median(ratios)
        # Mask: hard. A blurred or resampled mask would put one-pixel runs of
        # a third id between two different ids (a | blend | c) all along the
        # boundaries; hard polygons give almost none.
        left, mid, right = mask[:, :-2], mask[:, 1:-1], mask[:, 2:]
        transitions = (left != mid).sum()
        between = ((left != mid) & (mid != right) & (left != right)).sum()
        assert between <= 0.03 * transitions, (between, transitions)


def test_draw_person_other_sizes():
    for height, width in ((450, 300), (480, 640), (512, 512)):
        image, mask = synth.draw_person(np.random.default_rng([5, height]), height, width)
        assert image.shape == (height, width, 3) and mask.shape == (height, width)
        rows = np.nonzero((mask > 0).any(axis=1))[0]
        cols = np.nonzero((mask > 0).any(axis=0))[0]
        assert 0.5 <= (rows[-1] - rows[0] + 1) / height <= 0.95
        assert cols[-1] - cols[0] + 1 < width


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        synth.generate(str(tmp_path), 1, -1)
    with pytest.raises(ValueError, match="32x32"):
        synth.draw_person(np.random.default_rng(0), 10, 10)


def _run_cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    return subprocess.run([sys.executable, "-m", "popnet_tf.data.synth", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_help():
    result = _run_cli("--help")
    # absl's --help prints the flags and exits with status 1 by design.
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr
    text = result.stdout + result.stderr
    for flag in ("--out", "--num_images", "--seed", "--start_index"):
        assert flag in text


def test_cli_writes_the_same_files_as_the_library(written, tmp_path):
    root, ids = written
    result = _run_cli("--out", str(tmp_path / "cli"), "--num_images", "2", "--seed", str(SEED),
                      "--start_index", "1")
    assert result.returncode == 0, result.stderr
    for image_id in ids[1:3]:
        assert _file_bytes(str(tmp_path / "cli"), image_id) == _file_bytes(root, image_id)
    assert not os.path.exists(os.path.join(str(tmp_path / "cli"), "JPEGImages", ids[0] + ".jpg"))
    # A missing required flag is a usage error, not a traceback.
    result = _run_cli("--num_images", "1")
    assert result.returncode != 0 and "out" in result.stderr


@pytest.mark.benchmark
def test_speed_one_core_400x600(tmp_path):
    """At least 50 images/s for 400x600, drawing + encoding + writing, in
    CPU time of this process (wall time on a shared machine measures the
    neighbours). Run: `taskset -c 0 python -m pytest -m benchmark -s tests/test_synth.py`."""
    import time
    synth.draw_person(np.random.default_rng(0), 600, 400)  # warm caches
    num = 200
    start = time.process_time()
    for i in range(num):
        image, mask = synth.draw_person(np.random.default_rng([0, i]), 600, 400)
        jpg, png = synth.encode(image, mask)
        synth._write_atomic(str(tmp_path / f"{i}.jpg"), jpg)
        synth._write_atomic(str(tmp_path / f"{i}.png"), png)
    rate = num / (time.process_time() - start)
    print(f"synth: {rate:.1f} images/s (400x600, one core, CPU time)")
    assert rate >= 50
