"""Class sets, the ATR merge, the three stages' label spaces and the folds.

The one source for these facts (SPEC §2–§4): the data builder, the episode
pipeline, the models, the metrics and the CLIs all import them from here.

Example:
    >>> from popnet_tf import classes
    >>> classes.MERGED_NAMES[7]
    'shoes'
    >>> classes.novel_ids(stage=3, fold=1)
    (5, 7, 9)
"""

from __future__ import annotations

import numpy as np

IGNORE_LABEL = 255

# Raw ATR label ids: the PNG value is the id (SPEC §2).
RAW_ATR_NAMES = (
    "background", "hat", "hair", "sunglasses", "upper-clothes", "skirt",
    "pants", "dress", "belt", "left-shoe", "right-shoe", "face", "left-leg",
    "right-leg", "left-arm", "right-arm", "bag", "scarf",
)
NUM_RAW_CLASSES = len(RAW_ATR_NAMES)  # 18

# The 12 merged classes, numbered contiguously (SPEC §2 table).
MERGED_NAMES = (
    "background", "hat", "hair", "upper-clothes", "skirt", "pants", "dress",
    "shoes", "face", "legs", "arms", "bag",
)
NUM_CLASSES = len(MERGED_NAMES)  # 12

# raw id -> merged id. Symmetric parts merge; sunglasses, belt, scarf -> background.
_RAW_TO_MERGED = {
    0: 0, 1: 1, 2: 2, 3: 0, 4: 3, 5: 4, 6: 5, 7: 6, 8: 0, 9: 7, 10: 7,
    11: 8, 12: 9, 13: 9, 14: 10, 15: 10, 16: 11, 17: 0,
}

# The five main-body areas of stage 2 (SPEC §3).
AREA_NAMES = ("background", "head", "body", "arms", "legs")
NUM_AREAS = len(AREA_NAMES)
# merged id -> area id, in MERGED_NAMES order.
MERGED_TO_AREA = (0, 1, 1, 2, 2, 4, 2, 4, 1, 4, 3, 2)

STAGE_NUM_CLASSES = {1: 2, 2: NUM_AREAS, 3: NUM_CLASSES}
STAGE_CLASS_NAMES = {
    1: ("background", "human"),
    2: AREA_NAMES,
    3: MERGED_NAMES,
}

# Novel fine classes per fold (SPEC §4). "paper" is the default; "journal" is
# the fold definition of the authors' later journal-version code.
FOLDS = {
    "paper": {1: ("pants", "legs", "shoes"), 2: ("hair", "face", "hat")},
    "journal": {1: ("skirt", "pants", "dress"), 2: ("hat", "upper-clothes", "bag")},
}
DEFAULT_FOLD_SET = "paper"


def _lookup(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 table: listed ids map as given, 255 stays 255, the
    rest map to 255 too (callers validate values before using the table)."""
    table = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


RAW_TO_MERGED_TABLE = _lookup(_RAW_TO_MERGED)


def merged_to_stage_table(stage: int) -> np.ndarray:
    """256-entry uint8 table from merged ids (0–11, 255) to a stage's label space."""
    if stage == 1:
        return _lookup({c: int(c > 0) for c in range(NUM_CLASSES)})
    if stage == 2:
        return _lookup(dict(enumerate(MERGED_TO_AREA)))
    if stage == 3:
        return _lookup({c: c for c in range(NUM_CLASSES)})
    raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")


def _check_fold(fold: int, fold_set: str) -> tuple[str, ...]:
    if fold_set not in FOLDS:
        raise ValueError(f"unknown fold set {fold_set!r}; choose one of {sorted(FOLDS)}")
    if fold not in FOLDS[fold_set]:
        raise ValueError(f"fold must be one of {sorted(FOLDS[fold_set])}, got {fold!r}")
    return FOLDS[fold_set][fold]


def novel_ids(stage: int, fold: int, fold_set: str = DEFAULT_FOLD_SET) -> tuple[int, ...]:
    """Novel class ids of a fold in a stage's label space (sorted).

    Stage 3: the fold's fine classes. Stage 2: the areas of those classes (for
    the paper's folds exactly one area, SPEC §4). Stage 1 is supervised and has
    no novel class.
    """
    names = _check_fold(fold, fold_set)
    fine = sorted(MERGED_NAMES.index(n) for n in names)
    if stage == 1:
        return ()
    if stage == 2:
        return tuple(sorted({MERGED_TO_AREA[c] for c in fine}))
    if stage == 3:
        return tuple(fine)
    raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")


def base_ids(stage: int, fold: int, fold_set: str = DEFAULT_FOLD_SET) -> tuple[int, ...]:
    """Foreground class ids of a stage that are not novel in the fold."""
    novel = set(novel_ids(stage, fold, fold_set))
    return tuple(c for c in range(1, STAGE_NUM_CLASSES[stage]) if c not in novel)


def fold_mask_table(stage: int, fold: int, fold_set: str = DEFAULT_FOLD_SET) -> np.ndarray:
    """256-entry uint8 table on a stage's label space that relabels the fold's
    novel classes as background (training-time masking, SPEC §4)."""
    table = np.arange(256, dtype=np.uint8)
    table[list(novel_ids(stage, fold, fold_set))] = 0
    return table
