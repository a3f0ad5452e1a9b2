"""Tests of the ATR-OS builder (popnet_tf/data/build_atr_os.py, SPEC §2, §5).

Expected values are written by hand or computed here with NumPy/hashlib from the
input files, never by calling the builder a second way.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from popnet_tf.data import build_atr_os as b
from popnet_tf.data import features
from popnet_tf.data import synth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SPEC §2, written out by hand (not read from classes.py): raw ATR id -> merged id.
HAND_MERGE = {0: 0, 1: 1, 2: 2, 3: 0, 4: 3, 5: 4, 6: 5, 7: 6, 8: 0, 9: 7, 10: 7,
              11: 8, 12: 9, 13: 9, 14: 10, 15: 10, 16: 11, 17: 0, 255: 255}
MERGED = ["background", "hat", "hair", "upper-clothes", "skirt", "pants", "dress",
          "shoes", "face", "legs", "arms", "bag"]
# One raw id for each merged foreground class 1..11 (SPEC §2 table).
RAW_FOR_MERGED = {1: 1, 2: 2, 3: 4, 4: 5, 5: 6, 6: 7, 7: 10, 8: 11, 9: 13, 10: 14, 11: 16}

SMALL = dict(num_query_train=6, num_test_query=4, num_test_support=10, progress=False,
             num_workers=0)
# 17 usable images suffice.
TINY_TEST = {**SMALL, "num_test_query": 1, "num_query_train": 5, "num_test": 11}


# ----------------------------------------------------------------------------
# Writing ATR-layout inputs.


def _jpeg(array, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(array_or_image) -> bytes:
    img = array_or_image
    if not isinstance(img, Image.Image):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _put(root, sid, image_bytes=None, mask_bytes=None):
    for sub, data, ext in (("JPEGImages", image_bytes, ".jpg"),
                           ("SegmentationClassAug", mask_bytes, ".png")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        if data is not None:
            with open(os.path.join(root, sub, sid + ext), "wb") as f:
                f.write(data)


def _photo(rng, h=24, w=16):
    # Smooth content so that JPEG round trips stay close to the source.
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     np.full_like(x, int(rng.integers(0, 255)))], -1)
    return base.astype(np.uint8)


def _mask_with(merged_ids, h=24, w=16):
    """Raw mask holding exactly the given merged foreground classes (one band each)."""
    m = np.zeros((h, w), np.uint8)
    ids = sorted(merged_ids)
    for k, c in enumerate(ids):
        m[k * h // max(len(ids), 1):(k + 1) * h // max(len(ids), 1), : w // 2] = RAW_FOR_MERGED[c]
    return m


def _random_atr(root, n, seed=0, prefix="im", h=24, w=16):
    """n small image/mask pairs of random rectangles of raw ids 0-17: tiny and
    fast where a test needs many inputs or exact control over the masks."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        m = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(2, 7))):
            y, x = int(rng.integers(0, h - 3)), int(rng.integers(0, w - 3))
            m[y:y + int(rng.integers(2, 12)), x:x + int(rng.integers(2, 10))] = rng.integers(1, 18)
        sid = f"{prefix}_{i:04d}"
        _put(root, sid, _jpeg(_photo(rng, h, w)), _png(m))
        ids.append(sid)
    return ids


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """A few dozen synthetic people (popnet_tf.data.synth) in ATR layout."""
    root = str(tmp_path_factory.mktemp("synth"))
    return root, synth.generate(root, 36, seed=3, progress=False)


# ----------------------------------------------------------------------------
# Reading the output independently of the builder.


def _records(out, split):
    files = sorted(glob.glob(os.path.join(out, f"{split}-*-of-*.tfrecord")))
    return [r.numpy() for r in tf.data.TFRecordDataset(files)]


def _decoded(out, split):
    return [{k: v.numpy() for k, v in features.decode_example(r).items()}
            for r in _records(out, split)]


def _ids(out, split):
    return [tf.train.Example.FromString(r).features.feature[features.SOURCE_ID]
            .bytes_list.value[0].decode() for r in _records(out, split)]


def _tree(path):
    """{relative file name: sha256} of a folder."""
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _siblings(out):
    parent, base = os.path.split(out)
    return sorted(n for n in os.listdir(parent) if n.startswith(base + "."))


def _write_list(path, ids):
    with open(path, "w") as f:
        f.write("\n".join(ids) + "\n")
    return str(path)


# ----------------------------------------------------------------------------
# Content.


def test_merge_table_applied_and_round_trip(tmp_path):
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    # Image 0 holds every raw id 0-17 and 255 as columns: column j = raw[j].
    raw_values = np.array(list(range(18)) + [255], np.uint8)
    mask = np.tile(np.repeat(raw_values, 2), (10, 1))  # [10, 38]
    photo = _photo(np.random.default_rng(0), 10, 38)
    source_jpeg = _jpeg(photo)
    _put(root, "all_ids", source_jpeg, _png(mask))
    _random_atr(root, 24, seed=1, h=10, w=38)
    train = _write_list(tmp_path / "train.txt", ["all_ids"] + [f"im_{i:04d}" for i in range(10)])
    test = _write_list(tmp_path / "test.txt", [f"im_{i:04d}" for i in range(10, 24)])
    b.build(root, out, train_list=train, test_list=test, **SMALL)

    first = _decoded(out, "q_train")[0]
    assert first["source_id"] == b"all_ids"
    expected = np.vectorize(HAND_MERGE.get)(mask).astype(np.uint8)
    np.testing.assert_array_equal(first["mask"], expected)
    # merged ids present, background included, 255 excluded:
    # raw 0,3,8,17 -> 0; 1; 2; 4 -> 3; 5 -> 4; 6 -> 5; 7 -> 6; 9,10 -> 7; 11 -> 8; ...
    np.testing.assert_array_equal(first["classes"], np.arange(12))
    # A baseline RGB JPEG is stored byte for byte.
    example = tf.train.Example.FromString(_records(out, "q_train")[0])
    assert example.features.feature[features.IMAGE_ENCODED].bytes_list.value[0] == source_jpeg
    assert first["image"].shape == (10, 38, 3)
    pil = np.asarray(Image.open(io.BytesIO(source_jpeg)).convert("RGB"), np.int32)
    # TF and PIL upsample chroma slightly differently: a few levels apart at most.
    assert np.abs(first["image"].astype(np.int32) - pil).max() <= 4

    # Every other stored mask is the hand merge of its source PNG.
    for split in ("q_train", "s_train", "q_test", "s_test"):
        for ex in _decoded(out, split):
            sid = ex["source_id"].decode()
            src = np.asarray(Image.open(os.path.join(root, "SegmentationClassAug", sid + ".png")))
            np.testing.assert_array_equal(ex["mask"], np.vectorize(HAND_MERGE.get)(src))
            present = sorted(set(np.unique(ex["mask"]).tolist()) - {255})
            np.testing.assert_array_equal(ex["classes"], present)


def test_list_order_rule_and_shards(tmp_path):
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    ids = _random_atr(root, 40, seed=2)
    rng = np.random.default_rng(7)
    train = [ids[i] for i in rng.permutation(20)]
    test = [ids[20 + i] for i in rng.permutation(20)]
    os.remove(os.path.join(root, "SegmentationClassAug", train[2] + ".png"))  # unusable
    m = b.build(root, out, train_list=_write_list(tmp_path / "tr.txt", train),
                test_list=_write_list(tmp_path / "te.txt", test), num_shards=2,
                **{**SMALL, "num_query_train": 7, "num_test_query": 5, "num_test_support": 11})
    usable_train = train[:2] + train[3:]
    assert _ids(out, "q_train") == usable_train[:7]
    assert _ids(out, "s_train") == usable_train[7:]
    assert _ids(out, "q_test") == test[:5]
    assert _ids(out, "s_test") == test[5:16]  # the last 4 test ids are not used
    counts = {s: m["splits"][s]["count"] for s in m["splits"]}
    assert counts == {"q_train": 7, "s_train": 12, "q_test": 5, "s_test": 11}
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json"] + [f"{s}-0000{k}-of-00002.tfrecord" for s in counts for k in (0, 1)])
    # Contiguous shards: the first holds the first half of the list.
    first = tf.data.TFRecordDataset(os.path.join(out, "s_train-00000-of-00002.tfrecord"))
    assert [tf.train.Example.FromString(r.numpy()).features.feature[features.SOURCE_ID]
            .bytes_list.value[0].decode() for r in first] == usable_train[7:13]
    assert m["rejected"] == [{"id": train[2], "path": f"JPEGImages/{train[2]}.jpg",
                              "reason": f"missing mask: JPEGImages/{train[2]}.jpg: no mask "
                                        f"SegmentationClassAug/{train[2]}.png for this image"}]


def test_held_out_split_without_lists(synth_root, tmp_path):
    root, ids = synth_root
    out_a, out_b, out_c = (str(tmp_path / n) for n in "abc")
    kw = {**SMALL, "num_query_train": 10}
    b.build(root, out_a, seed=0, **kw)
    b.build(root, out_b, seed=0, **kw)
    b.build(root, out_c, seed=1, num_test=16, **kw)
    a = {s: _ids(out_a, s) for s in features.SPLITS}
    assert {s: len(v) for s, v in a.items()} == {"q_train": 10, "s_train": 36 - 14 - 10,
                                                  "q_test": 4, "s_test": 10}
    assert sorted(sum(a.values(), [])) == sorted(ids)  # disjoint and complete
    assert a == {s: _ids(out_b, s) for s in features.SPLITS}  # same seed, same split
    c = {s: _ids(out_c, s) for s in features.SPLITS}
    # num_test=16 holds out 16 of which 14 are used: 20 training images remain.
    assert len(c["q_train"]) + len(c["s_train"]) == 20
    assert sorted(sum(c.values(), [])) != sorted(ids) and len(sum(c.values(), [])) == 34
    assert c["q_test"] != a["q_test"]


def _official_ids():
    folder = os.path.join(REPO, "popnet_tf", "atr_os_official")
    with open(os.path.join(folder, "meta_train_id.txt")) as f:
        train = f.read().split()
    with open(os.path.join(folder, "meta_test_id.txt")) as f:
        test = f.read().split()
    return train, test


def test_official_lists_with_missing_ids(tmp_path):
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    train, test = _official_ids()
    assert (len(train), len(test)) == (15000, 2706)
    # Deliberately not sorted. The release's queries are train[:7501] and test[:201].
    train_here = [train[i] for i in (9000, 3, 14999, 500, 42)]
    test_here = [test[i] for i in (2705, 0, 7, 100, 1000, 1500, 2000, 2500, 11, 12, 13, 14,
                                   201, 300, 2600, 2704, 2703)]
    rng = np.random.default_rng(0)
    for sid in train_here + test_here:
        _put(root, sid, _jpeg(_photo(rng)), _png(_mask_with({1, 2, 3})))
    m = b.build(root, out, split_lists="official",
                **{**SMALL, "num_query_train": 2, "num_test_query": 1})
    pick = lambda full, idx: [full[i] for i in idx]  # noqa: E731
    assert _ids(out, "q_train") == pick(train, (3, 42))  # 500, a query, is not a support
    assert _ids(out, "s_train") == pick(train, (9000, 14999))
    assert _ids(out, "q_test") == pick(test, (0,))
    assert _ids(out, "s_test") == pick(test, (201, 300, 1000, 1500, 2000, 2500, 2600, 2703,
                                              2704, 2705))
    assert len(m["rejected"]) == 15000 - 5 + 2706 - 17
    missing = next(r for r in m["rejected"] if r["id"] == train[0])
    assert missing["path"] == f"JPEGImages/{train[0]}.jpg"
    assert missing["reason"].startswith("missing image:")
    assert m["source"]["split_lists"] == "official"
    # A held-out count means nothing with lists: refused, not silently ignored.
    with pytest.raises(b.DatasetError, match="num_test=40 applies only without split lists"):
        b.build(root, str(tmp_path / "out2"), split_lists="official", num_test=40, **SMALL)
    assert not os.path.exists(tmp_path / "out2")


def test_cli_official_lists(tmp_path):
    """The CLI front door with --split_lists=official."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    train, test = _official_ids()
    rng = np.random.default_rng(1)
    for sid in train[:1] + train[7501:7503] + test[:1] + test[201:211]:
        _put(root, sid, _jpeg(_photo(rng)), _png(_mask_with({2, 8})))
    proc = subprocess.run(
        [sys.executable, "-m", "popnet_tf.data.build_atr_os", f"--atr_root={root}",
         f"--out={out}", "--split_lists=official", "--num_query_train=1",
         "--num_test_query=1", "--num_test_support=10", "--num_workers=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _ids(out, "q_train") == train[:1] and _ids(out, "s_train") == train[7501:7503]
    assert f"skipped {15000 - 3 + 2706 - 11} of {15000 + 2706} inputs" in proc.stderr
    assert f"{15000 - 3 + 2706 - 11} missing image" in proc.stderr


def test_official_lists_log_bad_files_before_absent_ids(tmp_path, caplog):
    """With the official lists almost every rejection is a listed id not in the folder; the
    log's per-file lines showed the first 20 of those and hid a real bad mask."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    train, test = _official_ids()
    rng = np.random.default_rng(3)
    for sid in train[7499:7503] + test[199:213]:
        _put(root, sid, _jpeg(_photo(rng)), _png(_mask_with({2, 8})))
    bad = _mask_with({2, 8})
    bad[0, 0] = 40
    _put(root, train[7502], None, _png(bad))
    with caplog.at_level(logging.INFO, logger="absl"):
        b.build(root, out, split_lists="official", **{**SMALL, "num_query_train": 5,
                                                      "num_test_query": 5})
    assert f"skipped {train[7502]}: label out of range" in caplog.text


def test_official_lists_keep_the_release_split(tmp_path):
    """--split_lists=official keeps the authors' split (train[:7501] and test[:201] are their
    queries), whatever the numbers: the old first-N rule with the default 500 test queries
    made release supports queries, and with ids missing it moved the boundary."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    train, test = _official_ids()
    rng = np.random.default_rng(2)
    here = train[7499:7503] + test[199:213]
    for sid in here:
        _put(root, sid, _jpeg(_photo(rng)), _png(_mask_with({2, 8})))
    b.build(root, out, split_lists="official", **{**SMALL, "num_query_train": 5,
                                                  "num_test_query": 5})
    assert _ids(out, "q_train") == train[7499:7501]
    assert _ids(out, "s_train") == train[7501:7503]
    assert _ids(out, "q_test") == test[199:201]
    assert _ids(out, "s_test") == test[201:211]
    # Too few of the release's test supports: refused, naming the part of the list.
    shutil.rmtree(os.path.join(root, "JPEGImages"))
    for sid in train[7499:7503] + test[199:212]:
        _put(root, sid, _jpeg(_photo(rng)), _png(_mask_with({2, 8})))
    for sid in test[203:212]:
        os.remove(os.path.join(root, "JPEGImages", sid + ".jpg"))
    with pytest.raises(b.DatasetError, match=r"s_test: 2 usable images among the release's "
                                             r"supports \(entries 201-2705 of"):
        b.build(root, str(tmp_path / "out2"), split_lists="official", **SMALL)


# ----------------------------------------------------------------------------
# The ten test supports.


def test_test_supports_greedy_cover(tmp_path):
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    supports = {  # id: merged foreground classes
        "s01": {1, 2, 3, 4, 5}, "s02": {4, 5, 6, 7}, "s03": {6, 7, 8}, "s04": {8, 9, 10},
        "s05": {11}, "s06": {1, 2}, "s07": {9, 10, 11}, "s08": {2, 3}, "s09": set(),
        "s10": {1}, "s11": {3}, "s12": {5, 6, 7, 8, 9, 10},
    }
    rng = np.random.default_rng(3)
    for sid, cls in supports.items():
        _put(root, sid, _jpeg(_photo(rng)), _png(_mask_with(cls)))
    queries = _random_atr(root, 9, seed=4, prefix="q")
    b.build(root, out, train_list=_write_list(tmp_path / "tr.txt", queries[:7]),
            test_list=_write_list(tmp_path / "te.txt", queries[7:] + sorted(supports)),
            **{**SMALL, "num_query_train": 5, "num_test_query": 2, "num_test_support": 12})
    m = json.load(open(os.path.join(out, "manifest.json")))
    # By hand: s12 adds 6 classes; then s01 adds {1,2,3,4}; then for {11} s07 (3
    # classes) beats s05 (1); fill by class count then id: s02 (4), s03, s04 (3),
    # s06, s08 (2), s05, s10 (1).
    assert m["test_supports"] == ["s12", "s01", "s07", "s02", "s03", "s04", "s06", "s08",
                                  "s05", "s10"]
    assert m["test_supports_missing_classes"] == []


def test_test_supports_missing_class_recorded(tmp_path, caplog):
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    rng = np.random.default_rng(5)
    names = [f"t{i:02d}" for i in range(12)]
    for i, sid in enumerate(names):  # no image holds bag (11) or face (8)
        _put(root, sid, _jpeg(_photo(rng)), _png(_mask_with({1 + i % 7, 9, 10})))
    queries = _random_atr(root, 7, seed=6, prefix="q")
    with caplog.at_level(logging.WARNING):
        m = b.build(root, out, train_list=_write_list(tmp_path / "tr.txt", queries[:6]),
                    test_list=_write_list(tmp_path / "te.txt", queries[6:] + names),
                    **{**SMALL, "num_query_train": 5, "num_test_query": 1,
                       "num_test_support": 12})
    assert m["test_supports_missing_classes"] == ["face", "bag"]
    assert len(m["test_supports"]) == 10 and set(m["test_supports"]) <= set(names)
    assert "do not cover the classes ['face', 'bag']" in caplog.text


def test_masks_with_no_labelled_pixel_are_kept_and_named(tmp_path, caplog):
    """A mask of 255 everywhere (a conversion gone wrong) is a valid file, kept, but named."""
    root = str(tmp_path / "atr")
    ids = _random_atr(root, 30, seed=7)
    rng = np.random.default_rng(8)
    blanks = ["blank_a", "blank_b"]
    for sid in blanks:
        _put(root, sid, _jpeg(_photo(rng)), _png(np.full((24, 16), 255, np.uint8)))
    test_list = _write_list(tmp_path / "te.txt", ids[8:])
    for train, warned in ((ids[:8] + blanks, True), (ids[:8], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            m = b.build(root, str(tmp_path / f"out_{warned}"), test_list=test_list,
                        train_list=_write_list(tmp_path / "tr.txt", train), **SMALL)
        assert m["splits"]["q_train"]["count"] + m["splits"]["s_train"]["count"] == len(train)
        assert ("2 image(s) have masks with no labelled pixel (every pixel 255, ignore): kept"
                in caplog.text) == warned
        assert ("['blank_a', 'blank_b']" in caplog.text) == warned


@pytest.mark.parametrize("people", [0, 9])
def test_test_supports_without_a_person_are_refused(tmp_path, people):
    """Fewer than ten s_test images with a foreground class (0: the whole split is
    background or ignore, and k-way would score background alone, human MIoU 100%): the
    ten fixed supports would include empty ones, whose pairs are background alone and
    inflate background IoU and overall accuracy. Refused, naming how many have one, and
    OUT is not written."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    rng = np.random.default_rng(9)
    names = [f"t{i:02d}" for i in range(12)]
    for i, sid in enumerate(names):   # `people` with people, the rest all background or ignore
        mask = (_mask_with({1 + i % 11, 3}) if i < people
                else np.full((24, 16), 255 * (i % 2), np.uint8))
        _put(root, sid, _jpeg(_photo(rng)), _png(mask))
    queries = _random_atr(root, 7, seed=6, prefix="q")
    with pytest.raises(b.DatasetError, match=f"s_test: only {people} of its 12 images hold a foreground"):
        b.build(root, out, train_list=_write_list(tmp_path / "tr.txt", queries[:6]),
                test_list=_write_list(tmp_path / "te.txt", queries[6:] + names),
                **{**SMALL, "num_query_train": 5, "num_test_query": 1, "num_test_support": 12})
    assert not os.path.exists(out)
    assert sorted(os.listdir(tmp_path)) == ["atr", "te.txt", "tr.txt"]


def test_test_queries_without_any_person_are_refused(tmp_path):
    """q_test whose masks are all background or ignore: nothing to score (k-way would
    give every class IoU 0, one-way fails later). Refused, OUT not written."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    rng = np.random.default_rng(7)
    empty = [f"e{i}" for i in range(2)]
    for i, sid in enumerate(empty):
        _put(root, sid, _jpeg(_photo(rng)), _png(np.full((24, 16), 255 * i, np.uint8)))
    images = _random_atr(root, 16, seed=8, prefix="q")
    with pytest.raises(b.DatasetError, match="q_test: none of its 2 images holds a foreground"):
        b.build(root, out, train_list=_write_list(tmp_path / "tr.txt", images[:6]),
                test_list=_write_list(tmp_path / "te.txt", empty + images[6:]),
                **{**SMALL, "num_query_train": 5, "num_test_query": 2, "num_test_support": 10})
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------
# Manifest.


def test_manifest_content_and_checksums(synth_root, tmp_path):
    root, ids = synth_root
    out = str(tmp_path / "out")
    m = b.build(root, out, **{**SMALL, "num_query_train": 10}, num_shards=3)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == m
    assert m["format_version"] == 1
    assert m["class_names"] == MERGED
    assert m["folds"] == {"paper": {"1": ["pants", "legs", "shoes"], "2": ["hair", "face", "hat"]},
                          "journal": {"1": ["skirt", "pants", "dress"],
                                      "2": ["hat", "upper-clothes", "bag"]}}
    files = _tree(out)
    shard_files = {name for name in files if name.endswith(".tfrecord")}
    listed = {}
    for split in features.SPLITS:
        entry = m["splits"][split]
        listed.update(entry["shards"])
        decoded = _decoded(out, split)
        assert entry["count"] == len(decoded)
        per_class = np.zeros(12, int)
        for ex in decoded:
            per_class[sorted(set(np.unique(ex["mask"]).tolist()) - {255})] += 1
        assert entry["per_class"] == dict(zip(MERGED, per_class.tolist()))
    assert set(listed) == shard_files
    assert all(files[name] == sha for name, sha in listed.items())
    assert len(m["test_supports"]) == 10 and set(m["test_supports"]) <= set(_ids(out, "s_test"))
    assert m["rejected"] == []
    assert m["source"]["atr_root"] == os.path.abspath(root)
    assert m["source"]["seed"] == 0 and m["source"]["num_test"] == 14
    assert m["source"]["train_list"] is None


# ----------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_skipped_and_listed(tmp_path, caplog):
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    good = _random_atr(root, 20, seed=8)
    rng = np.random.default_rng(9)
    photo, mask = _photo(rng), _mask_with({1, 3})
    bad = {
        "truncated": (_jpeg(photo)[:-40], _png(mask)),
        "text": (b"this is not a JPEG\n", _png(mask)),
        "rgb_mask": (_jpeg(photo), _png(np.stack([mask, mask * 2, mask], -1))),  # coloured
        "wrong_size": (_jpeg(photo), _png(mask[:20])),
        "label40": (_jpeg(photo), _png(np.where(mask > 0, 40, 0).astype(np.uint8))),
        "no_mask": (_jpeg(photo), None),
        "no_image": (None, _png(mask)),
        "mask16": (_jpeg(photo), _png(np.where(mask > 0, 300, 0).astype(np.uint16))),
        "mask1bit": (_jpeg(photo), _png(Image.fromarray(mask > 0))),
    }
    for sid, (img, msk) in bad.items():
        _put(root, sid, img, msk)
    # Accepted oddities: re-encoded as RGB JPEG (or, for a palette mask, read as indices).
    gray = photo[..., 0]
    odd = {
        "gray": _jpeg(gray),
        "png_in_jpg": _png(photo),
        "palette": _png(Image.fromarray(photo).convert("P", palette=Image.ADAPTIVE, colors=8)),
        "progressive": _jpeg(photo, progressive=True),
        "rgba": _png(np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)])),
    }
    buf = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(buf, format="JPEG", quality=95)
    odd["cmyk"] = buf.getvalue()
    for sid, data in odd.items():
        _put(root, sid, data, _png(mask))
    # A palette mask whose colours have nothing to do with its indices: the
    # indices are the raw ids.
    palette_mask = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    palette_mask.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    _put(root, "palette_mask", _jpeg(photo), _png(palette_mask))
    # A 16-bit mask whose values are all ATR ids (as some annotation tools save them).
    _put(root, "mask16_ok", _jpeg(photo), _png(mask.astype(np.uint16)))
    # A grey mask an editor saved as opaque RGBA: its equal channels are the raw ids.
    _put(root, "grey_rgba_mask", _jpeg(photo),
         _png(np.dstack([mask] * 3 + [np.full(mask.shape, 255, np.uint8)])))
    with caplog.at_level(logging.INFO, logger="absl"):
        m = b.build(root, out, **{**SMALL, "num_test_query": 1, "num_test_support": 10,
                                  "num_query_train": 5, "num_test": 11})
    reasons = {r["id"]: (r["path"], r["reason"]) for r in m["rejected"]}
    assert sorted(reasons) == sorted(bad)
    assert reasons["truncated"][0] == "JPEGImages/truncated.jpg"
    assert reasons["truncated"][1].startswith("truncated image: JPEGImages/truncated.jpg:")
    assert reasons["text"][1].startswith("not an image: JPEGImages/text.jpg:")
    assert reasons["rgb_mask"][1].startswith(
        "mask not single-channel: SegmentationClassAug/rgb_mask.png: mask is in colour (")
    assert reasons["wrong_size"][1] == (
        "mask size mismatch: SegmentationClassAug/wrong_size.png: mask is 20x16 (rows x "
        "cols) but JPEGImages/wrong_size.jpg is 24x16")
    assert reasons["label40"][1].startswith(
        "label out of range: SegmentationClassAug/label40.png: label values 40 outside 0-17")
    assert reasons["no_mask"] == ("JPEGImages/no_mask.jpg", "missing mask: JPEGImages/no_mask.jpg: "
                                  "no mask SegmentationClassAug/no_mask.png for this image")
    assert reasons["no_image"][0] == "SegmentationClassAug/no_image.png"
    assert reasons["no_image"][1].startswith("missing image:")
    assert reasons["mask16"][1] == (
        "label out of range: SegmentationClassAug/mask16.png: label values 300 outside 0-17 "
        "(raw ATR ids; 255 = ignore; 'I;16' mask)")
    assert reasons["mask1bit"][1].startswith("mask not 8-bit: SegmentationClassAug/mask1bit.png")
    total = len(good) + len(bad) + len(odd) + 3
    assert (f"skipped 9 of {total} inputs: 2 label out of range, 1 mask not 8-bit, "
            "1 mask not single-channel, "
            "1 mask size mismatch, 1 missing image, 1 missing mask, 1 not an image, "
            "1 truncated image") in caplog.text

    # The accepted oddities are stored as 3-channel JPEGs close to their source.
    stored = {}
    for split in features.SPLITS:
        for raw in _records(out, split):
            ex = tf.train.Example.FromString(raw)
            sid = ex.features.feature[features.SOURCE_ID].bytes_list.value[0].decode()
            stored[sid] = (ex.features.feature[features.IMAGE_ENCODED].bytes_list.value[0],
                           {k: v.numpy() for k, v in features.decode_example(raw).items()})
    assert set(stored) == set(good) | set(odd) | {"palette_mask", "mask16_ok", "grey_rgba_mask"}
    for sid in odd:
        data, ex = stored[sid]
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.mode) == ("JPEG", "RGB"), sid
        assert "progressive" not in img.info and "progression" not in img.info, sid
        ref = np.dstack([gray] * 3) if sid == "gray" else photo
        tol = 40 if sid == "palette" else 12  # an 8-colour palette is coarse
        assert np.abs(ex["image"].astype(int) - ref).mean() < tol, sid
    for sid in ("palette_mask", "mask16_ok", "grey_rgba_mask"):
        np.testing.assert_array_equal(stored[sid][1]["mask"], np.vectorize(HAND_MERGE.get)(mask))


def _file(root, rel, data):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _encoded(image, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _with_orientation(array, orientation) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(Image.fromarray(array), "JPEG", quality=95, exif=exif)


def _stored(out) -> dict:
    """{source id: decoded example} over all splits."""
    return {ex["source_id"].decode(): ex for split in features.SPLITS
            for ex in _decoded(out, split)}


def test_photo_types_pillow_reads_are_accepted(tmp_path):
    """Photos in JPEGImages/ as PNG, WebP, TIFF, BMP or 16-bit grey PNG are read with
    Pillow and stored as RGB JPEG close to their pixels; HEIC is refused with a hint."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    _random_atr(root, 16, seed=20)
    rng = np.random.default_rng(21)
    photo, mask = _photo(rng), _mask_with({1, 3})
    grey16 = (photo[..., 0].astype(np.uint16) << 8) | 0x7F  # high byte = photo's red
    files = {
        "as_png.png": _png(photo),
        "as_webp.webp": _encoded(Image.fromarray(photo), "WEBP", lossless=True),
        "as_tiff.TIF": _encoded(Image.fromarray(photo), "TIFF"),
        "as_bmp.bmp": _encoded(Image.fromarray(photo), "BMP"),
        "grey16.png": _png(grey16),
        "iphone.heic": b"\0\0\0\x18ftypheic" + bytes(64),
    }
    for name, data in files.items():
        _file(root, f"JPEGImages/{name}", data)
        _file(root, f"SegmentationClassAug/{os.path.splitext(name)[0]}.png", _png(mask))
    m = b.build(root, out, **TINY_TEST)
    assert [(r["id"], r["reason"]) for r in m["rejected"]] == [
        ("iphone", "not an image: JPEGImages/iphone.heic: not an image file (PIL cannot "
                   "identify it); HEIC/HEIF photos need converting to JPEG first")]
    stored = _stored(out)
    for sid in ("as_png", "as_webp", "as_tiff", "as_bmp"):
        assert np.abs(stored[sid]["image"].astype(int) - photo).mean() < 3, sid
        np.testing.assert_array_equal(stored[sid]["mask"], np.vectorize(HAND_MERGE.get)(mask))
    # Pillow's convert("RGB") would clip every 16-bit value above 255 to white.
    grey = stored["grey16"]["image"].astype(int)
    assert np.abs(grey - photo[..., :1]).mean() < 3


def test_exif_orientation_follows_the_mask(tmp_path, caplog):
    """auto: a sideways phone photo (tag 6) whose mask has the upright size is turned
    upright; a tagged photo whose mask has the stored size stays as stored (ATR's
    convention) and is listed. upright / stored force one grid; a mask that matches
    the other grid is rejected with the flag to use."""
    root = str(tmp_path / "atr")
    _random_atr(root, 16, seed=30)
    rng = np.random.default_rng(31)
    photo = _photo(rng, 24, 16)          # as seen: 24 rows x 16 cols
    mask = _mask_with({1, 3}, 24, 16)
    sideways = np.rot90(photo, 1)        # stored 16 x 24; tag 6 turns it back (270 deg)
    np.testing.assert_array_equal(np.asarray(Image.fromarray(sideways).transpose(
        Image.Transpose.ROTATE_270)), photo)
    _put(root, "sideways", _with_orientation(sideways, 6), _png(mask))
    _put(root, "flipped", _with_orientation(photo, 3), _png(mask))   # mask of the stored grid
    with caplog.at_level(logging.INFO, logger="absl"):
        m = b.build(root, str(tmp_path / "auto"), **TINY_TEST)
    assert m["rejected"] == []
    assert m["exif"] == {"mode": "auto", "turned_upright": ["sideways"],
                         "kept_as_stored": ["flipped"]}
    assert "1 image(s) carry an EXIF orientation tag" in caplog.text
    assert "--exif=upright" in caplog.text
    stored = _stored(str(tmp_path / "auto"))
    assert stored["sideways"]["image"].shape == (24, 16, 3)
    assert np.abs(stored["sideways"]["image"].astype(int) - photo).mean() < 4
    assert np.abs(stored["flipped"]["image"].astype(int) - photo).mean() < 4

    m = b.build(root, str(tmp_path / "upright"), exif="upright", **TINY_TEST)
    flipped = _stored(str(tmp_path / "upright"))["flipped"]["image"].astype(int)
    assert np.abs(flipped - photo[::-1, ::-1]).mean() < 4
    assert m["exif"]["turned_upright"] == ["flipped", "sideways"]  # in id order

    m = b.build(root, str(tmp_path / "stored"), exif="stored", **TINY_TEST)
    assert [(r["id"], r["reason"]) for r in m["rejected"]] == [
        ("sideways", "mask size mismatch: SegmentationClassAug/sideways.png: mask is 24x16 "
                     "(rows x cols) but JPEGImages/sideways.jpg is 16x24 as stored; the photo "
                     "has EXIF orientation 6 and the mask matches it upright: build with "
                     "--exif=auto or --exif=upright")]
    with pytest.raises(b.DatasetError, match="exif must be one of auto, stored, upright"):
        b.build(root, str(tmp_path / "bad"), exif="rotate", **SMALL)


def test_exif_tagged_tiff_follows_the_mask_like_a_jpeg(tmp_path):
    """Pillow turns a TIFF upright while decoding it and drops the tag: the builder undoes
    that, so --exif decides for TIFFs as for JPEGs. Before, a TIFF tagged 3 whose mask
    follows the stored grid (ATR's convention) was silently stored turned 180 degrees
    against its mask, and one tagged 6 with a stored-grid mask was refused."""
    root = str(tmp_path / "atr")
    _random_atr(root, 16, seed=32)
    rng = np.random.default_rng(33)
    photo = _photo(rng, 24, 16)
    mask = _mask_with({1, 3}, 24, 16)
    sideways = np.rot90(photo, 1)                     # stored 16 x 24; tag 6 turns it back

    def tiff(array, orientation):
        exif = Image.Exif()
        exif[0x0112] = orientation
        return _encoded(Image.fromarray(array), "TIFF", exif=exif)

    for sid, data, mask_array in [("sideways", tiff(sideways, 6), mask),        # upright mask
                                  ("sideways_stored", tiff(sideways, 6), np.rot90(mask, 1)),
                                  ("flipped", tiff(photo, 3), mask)]:         # stored-grid mask
        os.makedirs(os.path.join(root, "SegmentationClassAug"), exist_ok=True)
        with open(os.path.join(root, "JPEGImages", sid + ".tif"), "wb") as f:
            f.write(data)
        with open(os.path.join(root, "SegmentationClassAug", sid + ".png"), "wb") as f:
            f.write(_png(np.ascontiguousarray(mask_array)))
    m = b.build(root, str(tmp_path / "auto"), **TINY_TEST)
    assert m["rejected"] == []
    assert m["exif"] == {"mode": "auto", "turned_upright": ["sideways"],
                         "kept_as_stored": ["flipped", "sideways_stored"]}
    stored = _stored(str(tmp_path / "auto"))
    assert np.abs(stored["sideways"]["image"].astype(int) - photo).mean() < 4
    assert np.abs(stored["sideways_stored"]["image"].astype(int) - sideways).mean() < 4
    assert np.abs(stored["flipped"]["image"].astype(int) - photo).mean() < 4
    m = b.build(root, str(tmp_path / "upright"), exif="upright", **TINY_TEST)
    assert [r["id"] for r in m["rejected"]] == ["sideways_stored"]
    flipped = _stored(str(tmp_path / "upright"))["flipped"]["image"].astype(int)
    assert np.abs(flipped - photo[::-1, ::-1]).mean() < 4


def test_unexpected_file_and_bad_lists(tmp_path):
    root = str(tmp_path / "atr")
    ids = _random_atr(root, 20, seed=10)
    with open(os.path.join(root, "JPEGImages", "notes.txt"), "w") as f:
        f.write("hello")
    m = b.build(root, str(tmp_path / "out"), **{**SMALL, "num_query_train": 4})
    assert m["rejected"] == [{"id": "notes", "path": "JPEGImages/notes.txt",
                              "reason": "unexpected file: JPEGImages/notes.txt: expected "
                                        "a photo <id>.jpg (or .png, .webp, .tif, .bmp...: "
                                        "popnet_tf.data.images.IMAGE_EXTENSIONS) in JPEGImages/"}]
    with pytest.raises(b.DatasetError, match="both the train and the test list"):
        b.build(root, str(tmp_path / "o2"), train_list=_write_list(tmp_path / "a", ids[:10]),
                test_list=_write_list(tmp_path / "b", ids[9:]), **SMALL)
    with pytest.raises(b.DatasetError, match="give both train_list and test_list"):
        b.build(root, str(tmp_path / "o3"), train_list=str(tmp_path / "a"), **SMALL)
    with pytest.raises(b.DatasetError, match="more than once"):
        b.build(root, str(tmp_path / "o4"), train_list=_write_list(tmp_path / "c", ids[:2] * 4),
                test_list=str(tmp_path / "b"), **SMALL)
    with pytest.raises(b.DatasetError, match=r"entry 2 '.+\.jpg' is a file name, not an ATR "
                                             r"id; list the ids without their suffix"):
        b.build(root, str(tmp_path / "o5"),
                train_list=_write_list(tmp_path / "d", [ids[0], ids[1] + ".jpg", *ids[2:10]]),
                test_list=str(tmp_path / "b"), **SMALL)


# ----------------------------------------------------------------------------
# Errors, determinism, atomic output.


def test_too_few_images(tmp_path):
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    ids = _random_atr(root, 20, seed=11)
    with pytest.raises(b.DatasetError, match=r"20 inputs found but the split asks for 9001"):
        b.build(root, out, progress=False, num_workers=0)  # 500 + 500 + 8000 + 1
    # Enough files, too few usable once bad ones are skipped: 20 found, 3 rejected.
    for sid in ids[:3]:
        os.remove(os.path.join(root, "SegmentationClassAug", sid + ".png"))
    with pytest.raises(b.DatasetError, match=r"17 usable images \(20 inputs found, 3 rejected"):
        b.build(root, out, **{**SMALL, "num_query_train": 4})  # 14 + 4 + 1 = 19 > 17
    with pytest.raises(b.DatasetError, match=r"train list .*: 2 usable images \(3 listed, 1 "
                                             r"rejected.*but 3 are needed"):
        b.build(root, out, train_list=_write_list(tmp_path / "tr", ids[2:5]),
                test_list=_write_list(tmp_path / "te", ids[5:]),
                **{**SMALL, "num_query_train": 2, "num_test_query": 4})
    with pytest.raises(b.DatasetError, match="num_test_support must be at least 10"):
        b.build(root, out, **{**SMALL, "num_test_support": 9})
    assert not os.path.exists(out) and _siblings(out) == []


def test_a_worker_that_dies_ends_the_build_in_one_line(synth_root, tmp_path):
    """A worker killed mid-build (the OOM killer on a huge photo) used to hang the build
    forever: multiprocessing.Pool replaced the worker and waited for its lost tasks (or,
    killed before its first task, as here, went on as if nothing had happened)."""
    import multiprocessing
    import threading

    root, _ = synth_root
    out = str(tmp_path / "out")
    before = set(multiprocessing.active_children())
    outcome = {}

    def run():
        try:
            b.build(root, out, **{**SMALL, "num_workers": 1})
            outcome["result"] = "finished"
        except Exception as e:  # noqa: BLE001 - the test looks at what it was
            outcome["result"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "result" not in outcome:
        workers = set(multiprocessing.active_children()) - before
        if workers:
            for w in workers:
                os.kill(w.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    thread.join(60)
    assert not thread.is_alive(), "the build hung after its worker was killed"
    assert isinstance(outcome["result"], b.DatasetError), outcome["result"]
    assert "worker process reading the images died" in str(outcome["result"])
    assert "--num_workers=0" in str(outcome["result"])
    assert not os.path.exists(out) and _siblings(out) == []


def test_determinism_across_worker_counts(synth_root, tmp_path):
    root, _ = synth_root
    out0, out2 = str(tmp_path / "w0"), str(tmp_path / "w2")
    kw = {**SMALL, "num_query_train": 10, "num_shards": 2}
    b.build(root, out0, **{**kw, "num_workers": 0})
    b.build(root, out2, **{**kw, "num_workers": 2})
    assert _tree(out0) == _tree(out2)
    # Rebuilding over an existing dataset replaces it with identical bytes.
    b.build(root, out0, **{**kw, "num_workers": 0})
    assert _tree(out0) == _tree(out2)
    assert _siblings(out0) == []
    # ... and so do other processes: protobuf writes an Example's feature map in an order
    # that follows Python's hash seed unless it serializes deterministically.
    for hash_seed in ("1", "2"):
        out = str(tmp_path / f"hash_seed{hash_seed}")
        proc = subprocess.run(
            [sys.executable, "-m", "popnet_tf.data.build_atr_os", f"--atr_root={root}",
             f"--out={out}", "--num_query_train=10", "--num_test_query=4",
             "--num_test_support=10", "--num_shards=2", "--num_workers=0", "--noprogress"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**_env(), "PYTHONHASHSEED": hash_seed})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _tree(out) == _tree(out2), hash_seed


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_build_keeps_previous_dataset(synth_root, tmp_path, monkeypatch, error):
    root, _ = synth_root
    out = str(tmp_path / "out")
    kw = {**SMALL, "num_query_train": 10, "num_shards": 2}
    b.build(root, out, **kw)
    before = _tree(out)
    real_write = b._write_shard
    calls = []

    def failing_write(path, records):
        calls.append(path)
        if len(calls) == 3:  # midway through the 8 shards
            raise error
        return real_write(path, records)

    monkeypatch.setattr(b, "_write_shard", failing_write)
    with pytest.raises(type(error)):
        b.build(root, out, **{**kw, "num_query_train": 9})
    assert len(calls) == 3
    assert _tree(out) == before
    assert _siblings(out) == []


def test_failed_swap_puts_previous_dataset_back(synth_root, tmp_path, monkeypatch):
    root, _ = synth_root
    out = str(tmp_path / "out")
    kw = {**SMALL, "num_query_train": 10}
    b.build(root, out, **kw)
    before = _tree(out)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in os.path.basename(src):  # moving the new dataset in
            raise OSError("simulated failure of the final rename")
        return real_replace(src, dst)

    monkeypatch.setattr(b.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        b.build(root, out, **{**kw, "num_query_train": 9})
    assert _tree(out) == before
    assert _siblings(out) == []


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(synth_root, tmp_path):
    root, _ = synth_root
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(b.DatasetError, match="not an ATR-OS dataset"):
        b.build(root, str(out), **SMALL)
    assert os.listdir(out) == ["thesis.tex"]


def _env():
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_sigkill_mid_build_then_next_build_cleans_up(tmp_path):
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    _random_atr(root, 300, seed=12, h=48, w=32)
    b.build(root, out, **{**SMALL, "num_query_train": 100})
    before = _tree(out)

    proc = subprocess.Popen(
        [sys.executable, "-m", "popnet_tf.data.build_atr_os", f"--atr_root={root}",
         f"--out={out}", "--num_query_train=50", "--num_test_query=4",
         "--num_test_support=10", "--num_workers=0", "--noprogress"],
        cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = os.path.join(f"{out}.tmp-{proc.pid}", "staging.bin")
    deadline = time.time() + 60
    while not (os.path.exists(staging) and os.path.getsize(staging) > 0):
        assert proc.poll() is None and time.time() < deadline, "build ended before the kill"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert _tree(out) == before  # the previous dataset is untouched
    assert _siblings(out) == [f"out.tmp-{proc.pid}"]  # the killed build's leftovers

    # A build killed between moving the old dataset aside and moving the new
    # one in: the next build puts the old one back before anything else.
    aside = f"{out}.old-{_dead_pid()}"
    os.replace(out, aside)
    with pytest.raises(b.DatasetError):
        b.build(root, out, **{**SMALL, "num_query_train": 1000})
    assert _tree(out) == before
    assert _siblings(out) == []  # the killed build's temp folder is gone too


# ----------------------------------------------------------------------------
# Files as users have them (audit A).


def test_file_name_not_utf8_is_skipped_not_a_traceback(tmp_path):
    """A photo and mask whose names are Latin-1 bytes (a zip from Windows unpacked
    here) were an id that could not be encoded into the Example: a UnicodeEncodeError
    traceback. Now both files are skipped with the name shown in \\x escapes."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    _random_atr(root, 17, seed=40)
    rng = np.random.default_rng(41)
    for sub, data in (("JPEGImages", _jpeg(_photo(rng))), ("SegmentationClassAug",
                                                           _png(_mask_with({1, 3})))):
        suffix = b".jpg" if sub == "JPEGImages" else b".png"
        with open(os.path.join(root.encode(), sub.encode(), b"caf\xe9" + suffix), "wb") as f:
            f.write(data)
    m = b.build(root, out, **TINY_TEST)
    assert [(r["path"], r["reason"]) for r in m["rejected"]] == [
        (f"{sub}/caf\\xe9{ext}", f"bad file name: {sub}/caf\\xe9{ext}: the file name is not "
                                 "valid UTF-8 (written in another encoding?); rename the file")
        for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClassAug", ".png"))]
    assert len(_stored(out)) == 17


def test_file_the_system_cannot_read_is_skipped(tmp_path, monkeypatch):
    """A photo or mask that open() refuses (no permission: a folder copied from another
    user; or removed since the scan) ended the build with a PermissionError traceback
    from the worker. Now each is skipped with the system's reason."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    ids = _random_atr(root, 19, seed=42)
    refused = {os.path.join(root, "JPEGImages", ids[0] + ".jpg"),
               os.path.join(root, "SegmentationClassAug", ids[1] + ".png")}
    real_open = open

    def open_as_another_user(path, *args, **kwargs):
        if str(path) in refused:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_as_another_user)
    m = b.build(root, out, **TINY_TEST)  # num_workers=0: the patch reaches _process
    assert [(r["id"], r["reason"]) for r in m["rejected"]] == [
        (ids[0], f"unreadable image: JPEGImages/{ids[0]}.jpg: cannot read the file "
                 "(PermissionError: Permission denied)"),
        (ids[1], f"unreadable mask: SegmentationClassAug/{ids[1]}.png: cannot read the file "
                 "(PermissionError: Permission denied)")]


def _png16(array) -> bytes:
    """A 16-bit PNG of an [H, W, C] array (C = 2 grey + alpha, 3 RGB, 4 RGBA), which
    Pillow cannot write."""
    import struct
    import zlib
    h, w, c = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    colour_type = {2: 4, 3: 2, 4: 6}[c]
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_colour_mask_is_refused_not_read_as_background(tmp_path):
    """A grey mask some tool saved as 16-bit RGB or grey + alpha: Pillow decodes only
    each value's high byte, so ids 0-17 all read 0 and the image was kept with a mask
    of background only, silently. Now refused as not 8-bit."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    _random_atr(root, 17, seed=44)
    rng = np.random.default_rng(45)
    mask = _mask_with({1, 3}).astype(np.uint16)
    opaque = np.full(mask.shape, 65535, np.uint16)
    _put(root, "rgb16", _jpeg(_photo(rng)), _png16(np.dstack([mask] * 3)))
    _put(root, "la16", _jpeg(_photo(rng)), _png16(np.dstack([mask, opaque])))
    _put(root, "rgba16", _jpeg(_photo(rng)), _png16(np.dstack([mask] * 3 + [opaque])))
    m = b.build(root, out, **TINY_TEST)
    assert [(r["id"], r["reason"]) for r in m["rejected"]] == [
        (sid, f"mask not 8-bit: SegmentationClassAug/{sid}.png: mask is a 16-bit {kind} PNG, "
              "whose values cannot be read as ATR ids (only their high byte is decoded); save "
              "it as an 8-bit single-channel ('L') or palette ('P') PNG")
        for sid, kind in (("la16", "grey + alpha"), ("rgb16", "RGB"), ("rgba16", "RGBA"))]


def test_photo_and_mask_names_in_different_unicode_forms_pair_up(tmp_path):
    """'café.jpg' written by one tool as NFC (é one character) and its mask by a Mac as
    NFD (e + combining accent) look the same but were two ids: the pair was skipped as
    'missing mask' and 'missing image' under names that look identical. They are one id
    now (NFC), also in a list file."""
    import unicodedata
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    ids = _random_atr(root, 17, seed=46)
    rng = np.random.default_rng(47)
    photo, mask = _photo(rng), _mask_with({1, 3})
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    _file(root, f"JPEGImages/{nfc}.jpg", _jpeg(photo))
    _file(root, f"SegmentationClassAug/{nfd}.png", _png(mask))
    m = b.build(root, out, **TINY_TEST)
    assert m["rejected"] == []
    np.testing.assert_array_equal(_stored(out)[nfc]["mask"], np.vectorize(HAND_MERGE.get)(mask))
    m = b.build(root, str(tmp_path / "listed"), train_list=_write_list(tmp_path / "tr", ids[:6]),
                test_list=_write_list(tmp_path / "te", ids[6:] + [nfd]),
                **{**SMALL, "num_query_train": 5, "num_test_query": 2})
    assert m["rejected"] == [] and nfc in _ids(str(tmp_path / "listed"), "s_test")


def test_broken_symlink_and_missing_mask_folder(tmp_path):
    """A photo that is a dangling symbolic link was skipped as 'missing image: no image
    JPEGImages/<id>.jpg' although ls lists that very name; it is a broken link now.
    A root without SegmentationClassAug/ gave a 'missing mask' line per image before
    the count error; now one line, as for a missing JPEGImages/."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    ids = _random_atr(root, 18, seed=48)
    photo = os.path.join(root, "JPEGImages", ids[0] + ".jpg")
    os.remove(photo)
    os.symlink(str(tmp_path / "gone.jpg"), photo)
    m = b.build(root, out, **TINY_TEST)
    assert [(r["path"], r["reason"]) for r in m["rejected"]] == [
        (f"JPEGImages/{ids[0]}.jpg", f"broken link: JPEGImages/{ids[0]}.jpg: a symbolic link "
                                     f"to {tmp_path / 'gone.jpg'}, which does not exist"),
        (f"SegmentationClassAug/{ids[0]}.png",
         f"missing image: SegmentationClassAug/{ids[0]}.png: no image JPEGImages/{ids[0]}.jpg "
         "(or .png, .webp, .tif...) for this mask")]
    shutil.rmtree(os.path.join(root, "SegmentationClassAug"))
    with pytest.raises(b.DatasetError, match=r"atr: no SegmentationClassAug/ folder; expected "
                                             r"ROOT/JPEGImages/<id>.jpg and ROOT/"):
        b.build(root, str(tmp_path / "o2"), **TINY_TEST)
    assert not os.path.exists(tmp_path / "o2") and _siblings(str(tmp_path / "o2")) == []


def test_photos_in_subfolders_are_named_in_the_error(tmp_path):
    """Photos one level too deep (JPEGImages/train/, as some dataset downloads are laid
    out) gave '0 inputs found but the split asks for ...', which does not say where
    the photos went."""
    root = tmp_path / "atr"
    _random_atr(str(tmp_path / "flat"), 17, seed=50)
    for sub in ("JPEGImages", "SegmentationClassAug"):
        os.makedirs(root / sub)
        os.rename(tmp_path / "flat" / sub, root / sub / "train")
    os.makedirs(root / "JPEGImages" / "val")
    with pytest.raises(b.DatasetError, match=r"atr: JPEGImages/ holds no photo, only the "
                                             r"subfolder\(s\) JPEGImages/train/, JPEGImages/val/; "
                                             r"the builder reads JPEGImages/<id>.jpg"):
        b.build(str(root), str(tmp_path / "out"), **TINY_TEST)
    assert not os.path.exists(tmp_path / "out") and _siblings(str(tmp_path / "out")) == []


def test_list_file_saved_by_notepad(tmp_path):
    """A list saved by Windows Notepad (UTF-8 with a byte-order mark, CRLF line ends):
    the mark became part of the first id, which was then skipped as 'missing image:
    no image JPEGImages/<id>.jpg' for a file that exists, and q_train shifted by one."""
    root, out = str(tmp_path / "atr"), str(tmp_path / "out")
    ids = _random_atr(root, 17, seed=52)
    train = tmp_path / "train.txt"
    train.write_bytes(b"\xef\xbb\xbf" + "".join(f"{i}\r\n" for i in ids[:6]).encode())
    m = b.build(root, out, train_list=str(train), test_list=_write_list(tmp_path / "te", ids[6:]),
                **{**SMALL, "num_query_train": 5, "num_test_query": 1})
    assert m["rejected"] == []
    assert _ids(out, "q_train") == ids[:5] and _ids(out, "s_train") == [ids[5]]


def test_out_in_an_unwritable_place_is_one_line(tmp_path):
    """The lock file beside OUT (and the build's temporary folder) need a writable parent;
    a parent that is a file ended in a FileExistsError / FileNotFoundError traceback."""
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(b.DatasetError, match="cannot write in its folder"):
        b.build(str(tmp_path / "atr"), str(tmp_path / "a_file" / "out"), **SMALL)


def test_test_supports_count_foreground_classes_only():
    # SPEC §5: supports are chosen for the foreground classes they cover; background
    # (0) is no class to cover. "a" (hat, hair; no background pixel) and "b"
    # (background, hat, upper-clothes) each add two foreground classes: a tie broken
    # by id, so "a". Counting background would rank "b" first.
    chosen, missing = b.select_test_supports({"a": [1, 2], "b": [0, 1, 3]}, num=1)
    assert chosen == ["a"]
    assert missing == [3, 4, 5, 6, 7, 8, 9, 10, 11]
