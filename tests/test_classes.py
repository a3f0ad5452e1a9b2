"""The merge table, stage label spaces and folds against SPEC §2-§4, written out by hand."""

import numpy as np
import pytest

from popnet_tf import classes


def test_merge_table_matches_spec():
    # SPEC §2: raw id -> merged id, written out independently of the module.
    expected = [0, 1, 2, 0, 3, 4, 5, 6, 0, 7, 7, 8, 9, 9, 10, 10, 11, 0]
    np.testing.assert_array_equal(classes.RAW_TO_MERGED_TABLE[:18], expected)
    assert classes.RAW_TO_MERGED_TABLE[255] == 255
    assert classes.MERGED_NAMES[7] == "shoes" and classes.NUM_CLASSES == 12


def test_stage_tables():
    s1 = classes.merged_to_stage_table(1)
    np.testing.assert_array_equal(s1[:12], [0] + [1] * 11)
    s2 = classes.merged_to_stage_table(2)
    # head: hat hair face; body: upper skirt dress bag; arms; legs: pants shoes legs
    np.testing.assert_array_equal(s2[:12], [0, 1, 1, 2, 2, 4, 2, 4, 1, 4, 3, 2])
    assert s2[255] == 255 and classes.merged_to_stage_table(3)[255] == 255
    with pytest.raises(ValueError):
        classes.merged_to_stage_table(4)


@pytest.mark.parametrize("fold,stage,expected", [
    (1, 3, (5, 7, 9)), (2, 3, (1, 2, 8)), (1, 2, (4,)), (2, 2, (1,)), (1, 1, ()),
])
def test_novel_ids(fold, stage, expected):
    assert classes.novel_ids(stage, fold) == expected


def test_fold_mask_table_relabels_novel_only():
    table = classes.fold_mask_table(3, 1)
    assert [int(table[c]) for c in (5, 7, 9)] == [0, 0, 0]
    assert [int(table[c]) for c in (1, 2, 3, 4, 6, 8, 10, 11, 255)] == [1, 2, 3, 4, 6, 8, 10, 11, 255]
    assert classes.base_ids(3, 1) == (1, 2, 3, 4, 6, 8, 10, 11)


def test_journal_folds_and_bad_fold():
    assert classes.novel_ids(3, 1, "journal") == (4, 5, 6)
    with pytest.raises(ValueError, match="fold"):
        classes.novel_ids(3, 3)
    with pytest.raises(ValueError, match="fold set"):
        classes.novel_ids(3, 1, "nope")


def test_journal_fold_2_and_journal_areas():
    # SPEC §4: journal fold 2 novel = hat, upper-clothes, bag -> merged ids 1, 3, 11.
    assert classes.novel_ids(3, 2, "journal") == (1, 3, 11)
    # Stage 2: hat -> head (1); upper-clothes, bag -> body (2). Fold 1: skirt, dress -> body,
    # pants -> legs (4).
    assert classes.novel_ids(2, 2, "journal") == (1, 2)
    assert classes.novel_ids(2, 1, "journal") == (2, 4)
