"""Tests of the episode pipeline (popnet_tf/data/episodes.py) on a small
hand-written ATR-OS dataset, plus one synth -> builder -> pipeline run."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from popnet_tf import classes
from popnet_tf.data import episodes, features

H, W = 40, 32          # fixture image size (rows, cols)
CROP = 24
NOVEL_ONLY = (5, 7, 9)  # pants, shoes, legs: the paper's fold-1 novel classes


def _mask_with(rng, ids, ignore=False) -> np.ndarray:
    """A merged-id mask of horizontal bands: background plus every id in `ids`."""
    mask = np.zeros((H, W), np.uint8)
    bands = np.array_split(np.arange(4, H - 4), max(len(ids), 1))
    for band, c in zip(bands, ids):
        left = int(rng.integers(0, 8))
        mask[band[0]:band[-1] + 1, left:left + 20] = c
    if ignore:
        mask[0:2, :10] = classes.IGNORE_LABEL  # part of a row: the image extent stays visible
    return mask


def _encode(mask: np.ndarray) -> tuple[bytes, bytes]:
    """JPEG of an image whose grey level encodes the label (label * 20), PNG of the mask."""
    grey = np.where(mask == 255, 250, mask.astype(np.int32) * 20).astype(np.uint8)
    image = np.repeat(grey[..., None], 3, axis=-1)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpg, format="JPEG", quality=98)
    Image.fromarray(mask).save(png, format="PNG")
    return jpg.getvalue(), png.getvalue()


def write_dataset(out_dir: str, split_masks: dict, test_supports: list[str], shards: int = 2) -> dict:
    """Writes `<split>-NNNNN-of-MMMMM.tfrecord` shards and a manifest.json as the
    builder does (DESIGN "Data on disk"). `split_masks[split]` = [(id, mask)]."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"format_version": 1, "class_names": list(classes.MERGED_NAMES), "splits": {},
                "test_supports": test_supports, "folds": {}, "rejected": [], "source": {}}
    for split, items in split_masks.items():
        n = min(shards, len(items))
        entry = {"count": len(items), "shards": {},
                 "per_class": {name: sum(int(c in np.unique(m)) for _, m in items)
                               for c, name in enumerate(classes.MERGED_NAMES)}}
        for k in range(n):
            name = features.shard_name(split, k, n)
            path = os.path.join(out_dir, name)
            with tf.io.TFRecordWriter(path) as writer:
                for sid, mask in items[k * len(items) // n:(k + 1) * len(items) // n]:
                    jpg, png = _encode(mask)
                    present = sorted(int(c) for c in np.unique(mask) if c != 255)
                    writer.write(features.make_example(jpg, png, sid, H, W, present).SerializeToString())
            with open(path, "rb") as f:
                entry["shards"][name] = hashlib.sha256(f.read()).hexdigest()
        manifest["splits"][split] = entry
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


def _class_sets():
    """Deterministic per-image class lists covering every merged class."""
    rng = np.random.default_rng(7)
    fg = list(range(1, classes.NUM_CLASSES))
    return rng, [sorted(rng.choice(fg, size=int(rng.integers(2, 5)), replace=False).tolist())
                 for _ in range(60)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng, sets = _class_sets()
    out = str(tmp_path_factory.mktemp("atr_os"))
    # Every class appears in q_train; s_train has supports holding only the
    # fold-1 novel classes, which must never be used in fold 1 (stages 2, 3).
    q_train = [(f"qt{i:02d}", _mask_with(rng, sets[i], ignore=i % 3 == 0)) for i in range(12)]
    q_train.append(("qt_novel", _mask_with(rng, NOVEL_ONLY)))
    s_train = [(f"st{i:02d}", _mask_with(rng, sets[20 + i])) for i in range(8)]
    s_train += [(f"st_novel{i}", _mask_with(rng, NOVEL_ONLY)) for i in range(6)]
    q_test = [(f"qe{i:02d}", _mask_with(rng, [1 + (3 * i + j) % 11 for j in range(3)], ignore=i == 0))
              for i in range(5)]
    s_test = [(f"se{i:02d}", _mask_with(rng, [1 + (i + j) % 11 for j in range(3)])) for i in range(12)]
    supports = [f"se{i:02d}" for i in (3, 0, 7, 1, 9, 2, 5, 11, 4, 6)]  # not in file order
    manifest = write_dataset(out, {"q_train": q_train, "s_train": s_train,
                                   "q_test": q_test, "s_test": s_test}, supports)
    return {"dir": out, "manifest": manifest, "q_test": q_test, "s_test": dict(s_test),
            "supports": supports}


def _take(ds, n):
    return [{k: v.numpy() for k, v in batch.items()} for batch in ds.take(n)]


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("way", ["kway", "oneway"])
def test_train_episode_shapes_ranges_and_rules(dataset, stage, way):
    ds = episodes.train_episodes(dataset["dir"], stage=stage, fold=1, way=way, batch_size=2,
                                 crop_size=CROP, scale_range=(0.7, 1.5), seed=stage)
    assert ds.element_spec["query_image"].shape == (2, CROP, CROP, 3)
    assert ds.element_spec["support_mask"].shape == (2, CROP, CROP)
    assert ds.element_spec["query_mask"].dtype == tf.int32
    assert ds.element_spec["query_image"].dtype == tf.float32
    novel = set(classes.novel_ids(stage, 1))
    allowed = set(range(classes.STAGE_NUM_CLASSES[stage])) - novel | {255}
    for batch in _take(ds, 6):
        assert batch["query_image"].min() >= 0 and batch["query_image"].max() <= 255
        for b in range(2):
            s_ids = set(np.unique(batch["support_mask"][b]).tolist())
            q_ids = set(np.unique(batch["query_mask"][b]).tolist())
            assert s_ids <= allowed and q_ids <= allowed, (s_ids, q_ids)
            fg = s_ids - {0, 255}
            assert fg, "support without a foreground class"
            assert q_ids <= fg | {0, 255}, (q_ids, s_ids)
            if way == "kway":
                assert batch["class_id"][b] == -1
            else:
                c = int(batch["class_id"][b])
                assert fg == {c}, (fg, c)
                assert q_ids <= {0, c, 255}


@pytest.mark.parametrize("fold", [1, 2])
def test_fold_masking_hides_novel_classes(dataset, fold):
    for stage in (2, 3):
        novel = set(classes.novel_ids(stage, fold))
        ds = episodes.train_episodes(dataset["dir"], stage=stage, fold=fold, batch_size=4,
                                     crop_size=CROP, scale_range=(1.0, 1.0), seed=fold)
        seen = set()
        for batch in _take(ds, 8):
            seen |= set(np.unique(batch["query_mask"]).tolist())
            seen |= set(np.unique(batch["support_mask"]).tolist())
        assert not seen & novel, (stage, fold, seen)
        assert len(seen - {0, 255}) >= 2, seen  # base classes do come through


def test_novel_only_supports_are_never_used(dataset):
    # The same pipeline without fold masking would use them: count how often a
    # support in stage 3 fold 2 shows only fold-1 novel classes, then check
    # fold 1 never does.
    def novel_only_supports(fold):
        ds = episodes.train_episodes(dataset["dir"], stage=3, fold=fold, batch_size=7,
                                     crop_size=CROP, scale_range=(1.0, 1.0), seed=0)
        hits = 0
        for batch in _take(ds, 6):
            for m in batch["support_mask"]:
                hits += set(np.unique(m).tolist()) - {0, 255} <= set(NOVEL_ONLY)
        return hits

    assert novel_only_supports(2) > 0
    assert novel_only_supports(1) == 0


def test_same_seed_same_episodes_other_seed_differs(dataset):
    def first(seed):
        return _take(episodes.train_episodes(dataset["dir"], stage=3, fold=1, batch_size=2,
                                             crop_size=CROP, seed=seed), 3)

    a, b, c = first(5), first(5), first(6)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["query_image"], z["query_image"]) for x, z in zip(a, c))


def test_cache_decoded_gives_same_episode_geometry(dataset):
    # Cached images are cropped after a full decode instead of decode_and_crop:
    # the masks (PNG, lossless) must be identical, the images equal to JPEG rounding.
    kwargs = dict(stage=2, fold=2, batch_size=2, crop_size=CROP, seed=3)
    lazy = _take(episodes.train_episodes(dataset["dir"], **kwargs), 3)
    cached = _take(episodes.train_episodes(dataset["dir"], cache_decoded=True, **kwargs), 3)
    for x, y in zip(lazy, cached):
        np.testing.assert_array_equal(x["query_mask"], y["query_mask"])
        np.testing.assert_array_equal(x["support_mask"], y["support_mask"])
        assert np.mean(np.abs(x["query_image"] - y["query_image"])) < 2.0


def test_stage1_dataset(dataset):
    ds = episodes.stage1_train_dataset(dataset["dir"], batch_size=3, crop_size=CROP,
                                       resize_long_side=30, seed=1)
    assert ds.element_spec["image"].shape == (3, CROP, CROP, 3)
    values = set()
    for batch in _take(ds, 5):
        values |= set(np.unique(batch["mask"]).tolist())
        # grey level encodes the merged label: human pixels are bright, background dark
        mask, image = batch["mask"], batch["image"][..., 0]
        assert np.median(image[mask == 1]) >= 15 and np.median(image[mask == 0]) < 5
    assert values <= {0, 1, 255} and {0, 1} <= values


def test_training_datasets_run_without_autotuning(dataset):
    """tf.data autotuning stays off: with it, deleting an epoch's iterator waited
    10-13 s for the autotune thread in about half the epochs on 2 cores."""
    stage1 = episodes.stage1_train_dataset(dataset["dir"], batch_size=2, crop_size=CROP, seed=1)
    oneshot = episodes.train_episodes(dataset["dir"], stage=3, fold=1, batch_size=2,
                                      crop_size=CROP, seed=1)
    for ds in (stage1, oneshot):
        options = ds.options()
        assert options.autotune.enabled is False
        assert options.deterministic is True


def test_resize_long_side_scales_images(dataset):
    # A crop bigger than the resized image: the image part measures the long side.
    ds = episodes.stage1_train_dataset(dataset["dir"], batch_size=4, crop_size=64,
                                       scale_range=(1.0, 1.0), resize_long_side=20, seed=0)
    for mask in _take(ds, 2)[0]["mask"]:
        rows = np.flatnonzero((mask != 255).any(axis=1))
        cols = np.flatnonzero((mask != 255).any(axis=0))
        assert len(rows) == 20 and len(cols) == 16, (len(rows), len(cols))  # 40x32 -> 20x16


# ----------------------------------------------------------------------------
# Test episodes.


def _expected_eval(mask, eval_size):
    """Independent NumPy reference of the eval geometry (round half up)."""
    h, w = mask.shape
    long_side = max(h, w)
    nh, nw = int(np.floor(h * eval_size / long_side + 0.5)), int(np.floor(w * eval_size / long_side + 0.5))
    rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(int), h - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(int), w - 1)
    out = np.full((eval_size, eval_size), 255, np.int64)
    out[:nh, :nw] = mask[rows][:, cols]
    return out, (nh, nw)


def test_test_supports_order_and_geometry(dataset):
    sup = episodes.test_supports(dataset["dir"], stage=3, eval_size=50)
    assert [s.decode() for s in sup["source_id"].numpy()] == dataset["supports"]
    assert sup["image"].shape == (10, 50, 50, 3) and sup["mask"].dtype == tf.int32
    for i, sid in enumerate(dataset["supports"]):
        expected, (nh, nw) = _expected_eval(dataset["s_test"][sid], 50)
        assert (nh, nw) == (50, 40)
        np.testing.assert_array_equal(sup["valid_size"][i].numpy(), [nh, nw])
        np.testing.assert_array_equal(sup["mask"][i].numpy(), expected)
        assert np.all(sup["image"][i].numpy()[:, nw:] == 0)


def test_test_queries_stage2_labels(dataset):
    queries = list(episodes.test_queries(dataset["dir"], stage=2, eval_size=20))
    assert [q["source_id"].numpy().decode() for q in queries] == [i for i, _ in dataset["q_test"]]
    table = np.array(classes.MERGED_TO_AREA + (0,) * 243 + (255,))
    for q, (_, merged) in zip(queries, dataset["q_test"]):
        np.testing.assert_array_equal(q["label"].numpy(), table[merged])
        expected, size = _expected_eval(table[merged], 20)
        np.testing.assert_array_equal(q["valid_size"].numpy(), size)
        np.testing.assert_array_equal(q["mask"].numpy(), expected)
        assert q["image"].shape == (20, 20, 3)


def test_kway_test_pairs_query_major(dataset):
    pairs = list(episodes.test_episodes(dataset["dir"], stage=3, fold=1, way="kway", eval_size=32))
    queries = [i for i, _ in dataset["q_test"]]
    assert len(pairs) == len(queries) * 10
    assert [p["query_id"].numpy().decode() for p in pairs] == [q for q in queries for _ in range(10)]
    assert [p["support_id"].numpy().decode() for p in pairs] == dataset["supports"] * len(queries)
    merged = dict(dataset["q_test"])
    for p in pairs:
        support = set(np.unique(p["support_mask"].numpy()).tolist()) - {255}
        label = merged[p["query_id"].numpy().decode()].astype(np.int64)
        expected = np.where(np.isin(label, list(support)) | (label == 255), label, 0)
        np.testing.assert_array_equal(p["query_label"].numpy(), expected)
        assert set(np.unique(p["query_mask"].numpy()).tolist()) <= support | {0, 255}
        assert int(p["class_id"]) == -1


def test_oneway_test_pairs(dataset):
    ds = episodes.test_episodes(dataset["dir"], stage=2, fold=2, way="oneway", eval_size=32,
                                pairs_per_class=4, seed=1)
    pairs = list(ds)
    by_class = {}
    for p in pairs:
        c = int(p["class_id"])
        by_class[c] = by_class.get(c, 0) + 1
        s_ids = set(np.unique(p["support_mask"].numpy()).tolist())
        assert c in s_ids and s_ids <= {0, c, 255}
        assert set(np.unique(p["query_label"].numpy()).tolist()) <= {0, c, 255}
        assert c in p["query_label"].numpy()
    assert by_class == {1: 4, 2: 4, 3: 4, 4: 4}
    # Ignore stays ignore in the one-way support (SPEC §5 relabels classes, not 255): the
    # 40x32 images are padded to 32x32 eval frames, and s_test's masks hold no 255 of their
    # own, so each support's 255 pixels are exactly the padding columns beyond 32*32/40.
    padding = np.zeros([32, 32], bool)
    padding[:, round(32 * W / H):] = True
    for p in pairs:
        np.testing.assert_array_equal(p["support_mask"].numpy() == 255, padding)
    again = list(episodes.test_episodes(dataset["dir"], stage=2, fold=2, way="oneway", eval_size=32,
                                        pairs_per_class=4, seed=1))
    assert [p["query_id"].numpy() for p in pairs] == [p["query_id"].numpy() for p in again]


def test_errors_name_the_problem(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="manifest"):
        episodes.train_episodes(str(tmp_path), stage=3, fold=1, batch_size=2, crop_size=CROP)
    with pytest.raises(ValueError, match="way"):
        episodes.train_episodes(dataset["dir"], stage=3, fold=1, way="twoway", batch_size=2, crop_size=CROP)
    with pytest.raises(ValueError, match="fold"):
        episodes.train_episodes(dataset["dir"], stage=3, fold=3, batch_size=2, crop_size=CROP)


# ----------------------------------------------------------------------------
# End to end: synthetic ATR folder -> ATR-OS builder -> episodes.


def test_synth_builder_pipeline_end_to_end(tmp_path):
    from popnet_tf.data import build_atr_os, synth

    synth.generate(str(tmp_path / "atr"), 40, seed=3, progress=False)
    manifest = build_atr_os.build(str(tmp_path / "atr"), str(tmp_path / "atr_os"), num_query_train=12,
                                  num_test_query=6, num_test_support=12, num_test=18, num_workers=0,
                                  progress=False)
    data = str(tmp_path / "atr_os")
    novel = set(classes.novel_ids(3, 1))
    for way in ("kway", "oneway"):
        ds = episodes.train_episodes(data, stage=3, fold=1, way=way, batch_size=2, crop_size=64,
                                     resize_long_side=80, seed=0)
        for batch in _take(ds, 3):
            for b in range(2):
                s_ids = set(np.unique(batch["support_mask"][b]).tolist())
                q_ids = set(np.unique(batch["query_mask"][b]).tolist())
                assert s_ids - {0, 255} and not (s_ids | q_ids) & novel
                assert q_ids <= s_ids | {0, 255}
    pairs = list(episodes.test_episodes(data, stage=3, fold=1, way="kway", eval_size=64))
    assert len(pairs) == 6 * 10
    assert [p["support_id"].numpy().decode() for p in pairs[:10]] == manifest["test_supports"]
    oneway = list(episodes.test_episodes(data, stage=2, fold=1, way="oneway", eval_size=64,
                                         pairs_per_class=2, seed=0))
    assert len(oneway) == 2 * 4
    for p in oneway:
        assert int(p["class_id"]) in p["support_mask"].numpy()


def test_ignore_label_survives_relabelling_when_the_support_has_none():
    # SPEC §5: classes absent from the support become background in the query; 255
    # (ignore, padding) is not a class and stays 255 even when the support mask holds
    # no 255 pixel (a square support has no eval padding). Reference written in NumPy.
    keep = np.zeros(256, bool)
    keep[[0, 3, 7]] = True                                    # support: background, 3, 7
    ids = np.arange(256)
    np.testing.assert_array_equal(episodes._keep_table(tf.constant(keep)).numpy(),
                                  np.where(keep | (ids == 255), ids, 0))
    label = np.array([[0, 3, 5], [7, 255, 9]], np.int32)
    query = {"image": tf.zeros([2, 3, 3]), "mask": tf.constant(label), "label": tf.constant(label),
             "valid_size": tf.constant([2, 3]), "source_id": tf.constant(b"q")}
    support = {"image": tf.zeros([2, 3, 3]), "mask": tf.constant([[0, 3], [7, 7]]),
               "source_id": tf.constant(b"s")}
    pair = episodes._pair(query, support, tf.constant(keep), -1)
    expected = np.array([[0, 3, 0], [7, 255, 0]])
    np.testing.assert_array_equal(pair["query_label"].numpy(), expected)
    np.testing.assert_array_equal(pair["query_mask"].numpy(), expected)
