"""The SPEC §5 test protocol and §8 metrics for trained stage models.

K-way evaluation encodes each of the ten fixed supports once and each query
once, then scores every (query, support) pair from the cached features: the
5000 pairs of the paper protocol cost 510 encoder passes, not 10000.

Example:
    >>> summary = evaluate_kway(stage3, data_dir="tfrecords/synthetic", stage=3,
    ...                         fold=1, eval_size=160)
    >>> summary["novel_miou"]
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf
from keras.utils import Progbar

from popnet_tf import classes, metrics
from popnet_tf.data import episodes
from popnet_tf.models.stages import gate_by_foreground


def test_prototypes(model, static, presence):
    """The prototypes a stage predicts with at test: POPNet's `test_prototypes`
    (store blend for base classes, with DP), a baseline's own (its identity store)."""
    if hasattr(model, "test_prototypes"):
        return model.test_prototypes(static, presence)
    return model.store(static, presence, training=False, use_dynamic=True)


def _to_label_resolution(probs, valid_size, label_shape):
    """[..., E, E, C] probabilities -> [..., h, w] labels at the ground truth's own
    resolution: crop the unpadded region, resize it bilinearly, take the argmax (SPEC §8)."""
    probs = probs[..., : valid_size[0], : valid_size[1], :]
    probs = tf.image.resize(probs, label_shape, method="bilinear")
    return tf.argmax(probs, axis=-1, output_type=tf.int32)


@tf.function(input_signature=[
    tf.TensorSpec([None, None, None, None], tf.float32),  # probabilities [S, E, E, C]
    tf.TensorSpec([2], tf.int32),                          # valid_size
    tf.TensorSpec([None, None], tf.int32),                 # label [h, w]
    tf.TensorSpec([None, None], tf.float32)])              # support presence [S, C]
def _score_against_supports(probs, valid_size, label, presence):
    """One query against all supports at once: predictions and relabelled truths
    [S, h, w] at the label's resolution, their [C, C] confusion matrix, and the [C, C]
    confusion of the original label over the pixels of classes a support did not hold
    (relabelled background in the truths; `metrics.kway_error_breakdown`)."""
    predictions = _to_label_resolution(probs, valid_size, tf.shape(label))
    num_classes = tf.shape(presence)[1]
    keep = tf.concat([tf.ones_like(presence[:, :1], tf.bool), presence[:, 1:] > 0], axis=1)
    kept = tf.gather(keep, tf.minimum(label, num_classes - 1), axis=1)    # [S, h, w]
    ignored = label[None] == classes.IGNORE_LABEL
    truths = tf.where(kept, label[None], tf.zeros_like(label[None]))
    truths = tf.where(ignored, label[None], truths)
    ignore = tf.fill(tf.shape(truths), classes.IGNORE_LABEL)
    absent = tf.where(kept | ignored, ignore, label[None])
    return (predictions, truths, metrics.batch_confusion_matrix(truths, predictions, num_classes),
            metrics.batch_confusion_matrix(absent, predictions, num_classes))


def _head_probs(out, head):
    """The probabilities of a head: "ncm", "agm", "mean" (POPNet), or "model": the
    model's own "probs" (the baselines, which have neither head)."""
    if head == "model":
        return out["probs"]
    if head == "ncm":
        return out["ncm_probs"]
    if head == "agm":
        return out["agm_probs"]
    return 0.5 * (out["agm_probs"] + out["ncm_probs"])


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(model, key, make):
    """One tf.function per (model, key), traced once and reused by every evaluation of
    that model: per-epoch validation would otherwise retrace the whole network (tens of
    seconds on a CPU) each time."""
    cache = _COMPILED.setdefault(model, {})
    if key not in cache:
        cache[key] = tf.function(make(), reduce_retracing=True)
    return cache[key]


def _check_gate(model, foreground_gate):
    """Before any tracing: a gate asked of a model without stage 1 is a clear error."""
    if not foreground_gate:
        return
    if not hasattr(model, "foreground_stage"):
        raise ValueError(f"the foreground gate needs a POPNet stage with stage 1 inside; "
                         f"{type(model).__name__} has none")
    model.foreground_stage()  # raises for a POPNet stage without previous stages


def _kway_scorer(model, head, foreground_gate=False):
    compute_agm = head != "ncm"

    def score(images, prototypes, presence):
        """[Q, E, E, 3] against [S, C, K] prototypes -> probabilities [Q, S, E, E, C]."""
        num_supports = tf.shape(prototypes)[0]
        if foreground_gate:  # stage 1's probability from the same pass, once per query
            feats, human = model.features_and_foreground(images)  # [Q, h, w, K], [Q, H, W, 1]
        else:
            feats = model.infused_features(images, training=False)
        q = tf.shape(feats)[0]
        tiled = tf.repeat(feats, num_supports, axis=0)  # query-major: [Q*S, h, w, K]
        out = model.heads(tiled, tf.tile(prototypes, [q, 1, 1]), tf.tile(presence, [q, 1]),
                          tf.repeat(images, num_supports, axis=0), compute_agm=compute_agm)
        probs = _head_probs(out, head)
        probs = tf.reshape(probs, tf.concat([[q, num_supports], tf.shape(probs)[1:]], 0))
        if foreground_gate:  # shared by the query's supports
            probs = gate_by_foreground(probs, human[:, None])
        return probs

    return score


def evaluate_kway(model, *, data_dir, stage, fold, fold_set="paper", eval_size,
                  head="ncm", foreground_gate=False, max_queries=None, query_batch=4,
                  progress=True, return_examples=0):
    """K-way OSHP (SPEC §5): every q_test query against the ten fixed supports.

    `foreground_gate` gates the head's probabilities by stage 1's human probability
    (`stages.gate_by_foreground`). Returns the §8 summary (fractions) plus `num_pairs`,
    `head`, `foreground_gate`, and, if `return_examples` > 0, that many (support, query,
    truth, prediction) arrays for galleries and TensorBoard.
    """
    _check_gate(model, foreground_gate)
    supports = episodes.test_supports(data_dir, stage=stage, eval_size=eval_size)
    static, presence = model.support_prototypes(supports["image"], supports["mask"], training=False)
    prototypes = test_prototypes(model, static, presence)  # [S, C, K]
    num_supports = int(prototypes.shape[0])
    num_classes = classes.STAGE_NUM_CLASSES[stage]
    scorer = _compiled(model, ("kway", head, foreground_gate),
                       lambda: _kway_scorer(model, head, foreground_gate))

    def score(images):
        return scorer(images, prototypes, presence)

    queries = episodes.test_queries(data_dir, stage=stage, eval_size=eval_size)
    if max_queries:
        queries = queries.take(max_queries)
    total = max_queries or None
    bar = Progbar(total, unit_name="query") if progress else None
    matrix = metrics.ConfusionMatrix(num_classes)
    absent_matrix = metrics.ConfusionMatrix(num_classes)  # pixels of classes a support lacked
    examples, seen = [], 0
    batch = []

    def flush(batch):
        nonlocal seen
        probs = score(tf.stack([b["image"] for b in batch]))
        for qi, query in enumerate(batch):
            preds, truths, cm, absent_cm = _score_against_supports(
                probs[qi], query["valid_size"], tf.cast(query["label"], tf.int32), presence)
            matrix.matrix += cm.numpy()
            absent_matrix.matrix += absent_cm.numpy()
            if len(examples) < return_examples:
                si = len(examples) % num_supports  # a different support for each example
                examples.append({"support_image": supports["image"][si].numpy(),
                                 "support_mask": supports["mask"][si].numpy(),
                                 "query_image": query["image"].numpy(),
                                 "truth": truths[si].numpy(), "prediction": preds[si].numpy(),
                                 "valid_size": query["valid_size"].numpy()})
            seen += 1
            if bar:
                bar.update(seen)

    for query in queries:
        batch.append(query)
        if len(batch) == query_batch:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    summary = metrics.kway_summary(matrix.result(), classes.novel_ids(stage, fold, fold_set),
                                   classes.STAGE_CLASS_NAMES[stage])
    summary.update({"num_pairs": seen * num_supports, "head": head,
                    "foreground_gate": bool(foreground_gate),
                    "test_supports": [s.decode() for s in supports["source_id"].numpy()],
                    "confusion_matrix": matrix.result().tolist(),
                    "absent_class_confusion_matrix": absent_matrix.result().tolist(),
                    "error_breakdown": metrics.kway_error_breakdown(
                        matrix.result(), absent_matrix.result(), classes.STAGE_CLASS_NAMES[stage])})
    if return_examples:
        summary["examples"] = examples
    return summary


def evaluate_foreground(model, *, data_dir, eval_size, max_queries=None, progress=True):
    """Stage 1 on q_test: foreground IoU, background IoU, MIoU and accuracy."""
    queries = episodes.test_queries(data_dir, stage=1, eval_size=eval_size)
    if max_queries:
        queries = queries.take(max_queries)

    predict = _compiled(model, ("foreground",),
                        lambda: lambda image: model(image[None], training=False)["probs"][0])

    matrix = metrics.ConfusionMatrix(2)
    bar = Progbar(max_queries, unit_name="image") if progress else None
    count = 0
    for query in queries:
        pred = _to_label_resolution(predict(query["image"]), query["valid_size"], tf.shape(query["label"]))
        matrix.update(query["label"], pred)
        count += 1
        if bar:
            bar.update(count)
    iou = metrics.per_class_iou(matrix.result())
    return {"foreground_iou": float(iou[1]), "background_iou": float(iou[0]),
            "miou": float(np.nanmean(iou)), "overall_acc": metrics.overall_accuracy(matrix.result()),
            "num_images": count}


def evaluate_oneway(model, *, data_dir, stage, fold, fold_set="paper", eval_size,
                    head="ncm", foreground_gate=False, pairs_per_class=500, seed=0,
                    progress=True, return_examples=0):
    """One-way OSHP (SPEC §5): per foreground class, seeded (support, query) pairs of
    images containing it; binary confusion matrices per class (SPEC §8).

    With `return_examples` > 0, the first pair of that many classes comes back as
    (support, query, truth, prediction) arrays under "examples" (truth and
    prediction in the stage's labels: c or 0)."""
    pairs = episodes.test_episodes(data_dir, stage=stage, fold=fold, fold_set=fold_set,
                                   way="oneway", eval_size=eval_size,
                                   pairs_per_class=pairs_per_class, seed=seed)
    compute_agm = head != "ncm"
    _check_gate(model, foreground_gate)

    def make_predict():
        def predict(query_image, support_image, support_mask):
            static, presence = model.support_prototypes(support_image[None], support_mask[None])
            prototypes = test_prototypes(model, static, presence)
            if foreground_gate:
                feats, human = model.features_and_foreground(query_image[None])
            else:
                feats = model.infused_features(query_image[None], training=False)
            out = model.heads(feats, prototypes, presence, query_image[None], compute_agm=compute_agm)
            probs = _head_probs(out, head)
            if foreground_gate:
                probs = gate_by_foreground(probs, human)
            return probs[0]
        return predict

    predict = _compiled(model, ("oneway", head, foreground_gate), make_predict)

    matrices: dict[int, np.ndarray] = {}
    examples, shown = [], set()
    count = 0
    known = int(pairs.cardinality())  # the pairs are listed up front, so usually known
    bar = Progbar(known if known >= 0 else None, unit_name="pair") if progress else None
    for pair in pairs:
        c = int(pair["class_id"])
        probs = predict(pair["query_image"], pair["support_image"], pair["support_mask"])
        pred = _to_label_resolution(probs, pair["valid_size"], tf.shape(pair["query_label"]))
        truth = pair["query_label"]
        valid = truth != classes.IGNORE_LABEL
        binary_truth = tf.where(valid, tf.cast(truth == c, tf.int32), classes.IGNORE_LABEL)
        binary_pred = tf.cast(pred == c, tf.int32)
        matrices[c] = matrices.get(c, 0) + metrics.batch_confusion_matrix(binary_truth, binary_pred, 2).numpy()
        if len(examples) < return_examples and c not in shown:
            shown.add(c)
            examples.append({"support_image": pair["support_image"].numpy(),
                             "support_mask": pair["support_mask"].numpy(),
                             "query_image": pair["query_image"].numpy(),
                             "truth": truth.numpy(), "prediction": (binary_pred * c).numpy(),
                             "valid_size": pair["valid_size"].numpy()})
        count += 1
        if bar:
            bar.update(count)
    summary = metrics.oneway_summary(matrices, classes.novel_ids(stage, fold, fold_set),
                                     classes.STAGE_NUM_CLASSES[stage], classes.STAGE_CLASS_NAMES[stage])
    summary.update({"num_pairs": count, "head": head, "foreground_gate": bool(foreground_gate)})
    if return_examples:
        summary["examples"] = examples
    return summary
