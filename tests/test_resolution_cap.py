"""scripts/resolution_cap.py: the IoU a perfect grid-limited prediction gets, on masks
whose answer is known by hand."""


import numpy as np
import pytest

from popnet_tf import classes
from tests.script_loader import load_script
from tests.test_episodes import H, W, write_dataset

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One q_test label (40 x 32): upper-clothes on a block aligned with the 4-pixel grid,
    hair as a stripe one pixel high; the other splits only make the dataset complete."""
    mask = np.zeros((H, W), np.uint8)
    mask[8:24, 8:24] = 3            # upper-clothes: 4 x 4 cells exactly
    mask[30, 4:28] = 2              # hair: a quarter of each cell it crosses
    other = np.zeros((H, W), np.uint8)
    other[4:12, 4:12] = 1
    out = str(tmp_path_factory.mktemp("cap"))
    write_dataset(out, {"q_train": [("a", other)], "s_train": [("b", other)],
                        "q_test": [("q", mask)], "s_test": [("s", other)]}, ["s"], shards=1)
    return out


def test_grid_ceiling_by_hand(data_dir):
    cap = load_script("resolution_cap")
    confusions = cap.cap_confusions(data_dir, eval_size=H, strides=[1, 4])
    labelled = np.bincount(np.array([0] * (H * W - 256 - 24) + [3] * 256 + [2] * 24), minlength=12)
    # Stride 1 at the label's own size: every pixel right.
    np.testing.assert_array_equal(confusions[1], np.diag(labelled))
    # Stride 4: the aligned block keeps its edges (bilinear crosses 1/2 on them, between
    # pixel centres: 0.625 inside, 0.375 outside) but not its four corner pixels, where
    # the block's share is 0.625 x 0.625 < 1/2; the one-pixel stripe is a quarter of the
    # cells it crosses, so it is background everywhere.
    cm4 = confusions[4]
    assert cm4[3, 3] == 256 - 4 and cm4[3, 0] == 4 and cm4[:, 3].sum() == 256 - 4
    assert cm4[2, 2] == 0 and cm4[2, 0] == 24
    table = cap.cap_table(confusions, fold=1)
    rows = {line.split(" | ")[0]: line for line in table.splitlines()[2:]}
    cells = rows["| 1/4"].split(" | ")
    names = list(classes.MERGED_NAMES)
    assert cells[1 + names.index("upper-clothes")] == f"{100 * 252 / 256:.1f}"
    assert cells[1 + names.index("hair")] == "0.0"


def test_smaller_eval_size_scales_the_grid(data_dir):
    """eval_size 20 halves the image first: stride 2 then has 4-pixel cells at label size,
    the same ceiling as stride 4 at full size."""
    cap = load_script("resolution_cap")
    np.testing.assert_array_equal(cap.cap_confusions(data_dir, eval_size=H // 2, strides=[2])[2],
                                  cap.cap_confusions(data_dir, eval_size=H, strides=[4])[4])


def test_absent_classes_are_left_out_of_the_means(data_dir):
    """Only hair and upper-clothes are in the labels: at stride 1 the base MIoU is theirs,
    100.0, and the novel classes (none present) are n/a; absent classes used to count
    as IoU 0 (base 25.0, novel 0.0)."""
    cap = load_script("resolution_cap")
    table = cap.cap_table(cap.cap_confusions(data_dir, eval_size=H, strides=[1]), fold=1)
    cells = table.splitlines()[2].split(" | ")
    names = list(classes.MERGED_NAMES)
    assert cells[1 + names.index("hat")] == "n/a"
    assert cells[-2:] == ["100.0", "n/a |"]


@pytest.mark.parametrize("strides, eval_size, fold, flag", [
    (["0"], 144, 1, "--strides"), (["a"], 144, 1, "--strides"), (["4"], 0, 1, "--eval_size"),
    (["4"], 144, 3, "--fold"), (["4"], 144, 1, "--data")])
def test_bad_flags_named_before_the_pass(data_dir, strides, eval_size, fold, flag):
    cap = load_script("resolution_cap")
    data = data_dir if flag != "--data" else data_dir + "/nowhere"
    with pytest.raises((ValueError, FileNotFoundError), match=flag):
        cap.check_flags(data, eval_size, strides, fold)
