"""The SPEC §5 test protocol and §8 metrics for trained stage models.

K-way evaluation encodes each of the ten fixed supports once and each query
once, then scores every (query, support) pair from the cached features: the
5000 pairs of the paper protocol cost 510 encoder passes, not 10000. `evaluate`
runs the whole protocol on a training workdir and writes its outputs (the library
behind `python -m popnet_tf.evaluate`); the Fine-tune baseline is tuned on each
support instead (`finetune_kway`, `finetune_oneway`).

Example:
    >>> summary = evaluate_kway(stage3, data_dir="tfrecords/synthetic", stage=3,
    ...                         fold=1, eval_size=160)
    >>> summary["novel_miou"]
    >>> results = evaluate("workdirs/synthetic_cpu_fold1", way="oneway")
"""

from __future__ import annotations

import io
import json
import os
import time
import weakref

import numpy as np
import tensorflow as tf
from absl import logging
from keras.utils import Progbar
from ml_collections import config_dict

from popnet_tf import classes, integrity, losses, metrics
from popnet_tf.data import episodes
from popnet_tf.models import baselines
from popnet_tf.models.stages import PREDICTION_HEADS, gate_by_foreground


def test_prototypes(model, static, presence):
    """The prototypes a stage predicts with at test: POPNet's `test_prototypes`
    (store blend for base classes, with DP), a baseline's own (its identity store)."""
    if hasattr(model, "test_prototypes"):
        return model.test_prototypes(static, presence)
    return model.store(static, presence, training=False, use_dynamic=True)


def pair_progress_bar(pairs: tf.data.Dataset) -> Progbar:
    """A console bar over one-way pairs, with their total: the pairs are listed up front,
    so their dataset's cardinality is known (else the bar counts without a total)."""
    return Progbar(_known_length(pairs), unit_name="pair")


def _known_length(dataset: tf.data.Dataset) -> int | None:
    """The dataset's length where tf.data knows it (the test splits carry the manifest's
    count), else None: a progress bar's total."""
    known = int(dataset.cardinality())
    return known if known >= 0 else None


def _first_queries(queries: tf.data.Dataset, max_queries: int | None) -> tf.data.Dataset:
    """The first `max_queries` q_test queries (all for None or 0)."""
    return queries.take(max_queries) if max_queries else queries


def _to_label_resolution(probs, valid_size, label_shape):
    """[..., E, E, C] probabilities -> [..., h, w] labels at the ground truth's own
    resolution: crop the unpadded region, resize it bilinearly, take the argmax (SPEC §8)."""
    probs = probs[..., : valid_size[0], : valid_size[1], :]
    probs = tf.image.resize(probs, label_shape, method="bilinear")
    return tf.argmax(probs, axis=-1, output_type=tf.int32)


def _score_pair(probs, valid_size, label, presence):
    """One query against one support: the prediction and the relabelled truth [h, w] at
    the label's resolution, their [C, C] confusion matrix, and the [C, C] confusion of the
    original label over the pixels of classes the support did not hold (relabelled
    background in the truth; `metrics.kway_error_breakdown`)."""
    prediction = _to_label_resolution(probs, valid_size, tf.shape(label))
    num_classes = tf.shape(presence)[0]
    keep = tf.concat([[True], presence[1:] > 0], axis=0)
    kept = tf.gather(keep, tf.minimum(label, num_classes - 1))             # [h, w]
    ignored = label == classes.IGNORE_LABEL
    truth = tf.where(kept | ignored, label, tf.zeros_like(label))
    absent = tf.where(kept | ignored, tf.fill(tf.shape(label), classes.IGNORE_LABEL), label)
    return (prediction, truth, metrics.batch_confusion_matrix(truth, prediction, num_classes),
            metrics.batch_confusion_matrix(absent, prediction, num_classes))


_PAIR_SPEC = [tf.TensorSpec([None, None, None], tf.float32),  # probabilities [E, E, C]
              tf.TensorSpec([2], tf.int32),                     # valid_size
              tf.TensorSpec([None, None], tf.int32),            # label [h, w]
              tf.TensorSpec([None], tf.float32)]                # support presence [C]


@tf.function(input_signature=[
    tf.TensorSpec([None, None, None, None], tf.float32),  # probabilities [S, E, E, C]
    *_PAIR_SPEC[1:3],
    tf.TensorSpec([None, None], tf.float32)])              # support presence [S, C]
def _score_against_supports(probs, valid_size, label, presence):
    """One query against every support: the summed [C, C] confusion matrix and absent-class
    matrix (`_score_pair`). One support at a time, so memory holds one full-resolution
    probability map, not S of them (a 12 MP label: 0.6 instead of 5.8 GB for 10 supports)."""
    def one(args):
        return _score_pair(args[0], valid_size, label, args[1])[2:]

    spec = tf.TensorSpec([None, None], tf.int64)
    cms, absent = tf.map_fn(one, (probs, presence), fn_output_signature=(spec, spec),
                            parallel_iterations=1)
    return tf.reduce_sum(cms, axis=0), tf.reduce_sum(absent, axis=0)


@tf.function(input_signature=_PAIR_SPEC)
def _example_pair(probs, valid_size, label, presence):
    """(prediction, relabelled truth) [h, w] of one pair, for galleries."""
    return _score_pair(probs, valid_size, label, presence)[:2]


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

    queries = _first_queries(episodes.test_queries(data_dir, stage=stage, eval_size=eval_size),
                             max_queries)
    total = _known_length(queries)
    bar = Progbar(total, unit_name="query") if progress else None
    matrix = metrics.ConfusionMatrix(num_classes)
    absent_matrix = metrics.ConfusionMatrix(num_classes)  # pixels of classes a support lacked
    examples, seen = [], 0
    batch = []

    def flush(batch):
        nonlocal seen
        probs = score(tf.stack([b["image"] for b in batch]))
        for qi, query in enumerate(batch):
            label = tf.cast(query["label"], tf.int32)
            cm, absent_cm = _score_against_supports(probs[qi], query["valid_size"], label, presence)
            matrix.matrix += cm.numpy()
            absent_matrix.matrix += absent_cm.numpy()
            if len(examples) < return_examples:
                si = len(examples) % num_supports  # a different support for each example
                pred, truth = _example_pair(probs[qi][si], query["valid_size"], label, presence[si])
                examples.append(_example(supports["image"][si], supports["mask"][si],
                                         query["image"], truth, pred, query["valid_size"]))
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
    summary = _kway_results(matrix, absent_matrix, supports, stage, fold, fold_set,
                            num_pairs=seen * num_supports, head=head,
                            foreground_gate=bool(foreground_gate))
    if return_examples:
        summary["examples"] = examples
    return summary


def _kway_results(matrix, absent_matrix, supports, stage, fold, fold_set, **extra) -> dict:
    """The k-way summary (SPEC §8) from the accumulated confusion matrices, with the test
    supports' ids, both matrices, the error breakdown and `extra` (num_pairs, head...)."""
    names = classes.STAGE_CLASS_NAMES[stage]
    summary = metrics.kway_summary(matrix.result(), classes.novel_ids(stage, fold, fold_set), names)
    summary.update(extra)
    # A class with no ground-truth pixel in any pair (after SPEC §5's relabelling) drops out
    # of the means: novel MIoU over fewer classes says something else, so say which.
    unseen = [names[c] for c in np.flatnonzero(matrix.result().sum(axis=1) == 0)]
    if unseen:
        logging.warning("k-way: no pair's ground truth holds %s: a class with no true pixel "
                        "scores IoU 0 if it is predicted anywhere and is left out of the "
                        "MIoUs otherwise", ", ".join(unseen))
    summary["classes_without_ground_truth"] = unseen
    summary.update({"test_supports": [s.decode() for s in supports["source_id"].numpy()],
                    "confusion_matrix": matrix.result().tolist(),
                    "absent_class_confusion_matrix": absent_matrix.result().tolist(),
                    "error_breakdown": metrics.kway_error_breakdown(
                        matrix.result(), absent_matrix.result(), names)})
    return summary


def evaluate_foreground(model, *, data_dir, eval_size, max_queries=None, progress=True):
    """Stage 1 on q_test: foreground IoU, background IoU, MIoU and accuracy."""
    queries = _first_queries(episodes.test_queries(data_dir, stage=1, eval_size=eval_size),
                             max_queries)

    predict = _compiled(model, ("foreground",),
                        lambda: lambda image: model(image[None], training=False)["probs"][0])

    matrix = metrics.ConfusionMatrix(2)
    bar = Progbar(_known_length(queries), unit_name="image") if progress else None
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
    bar = pair_progress_bar(pairs) if progress else None
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


# ============================================================ a trained workdir
WAYS = ("kway", "oneway")
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
GALLERY_FILE = "gallery.png"


def eval_dir(workdir: str, fold: int, way: str, foreground_gate: bool = False,
             stage: int = 3) -> str:
    """W/eval/fold<F>_<way>/, with `_stage2` for stage 2 (its results used to overwrite
    stage 3's) and `_foreground_gate` for gated results."""
    return os.path.join(workdir, "eval", f"fold{fold}_{way}" + ("" if stage == 3 else f"_stage{stage}")
                        + ("_foreground_gate" if foreground_gate else ""))


def load_run(workdir: str) -> tuple[config_dict.ConfigDict, int]:
    """(config, fold) recorded by training in `workdir/run.json`."""
    from popnet_tf import train_lib  # train_lib imports this module

    path = os.path.join(workdir, train_lib.RUN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: not found; is {workdir} a training workdir? Train first: "
            f"python -m popnet_tf.train --workdir {workdir} --fold 1 --stage 3")
    record = _read_run(path)
    if "config" not in record:
        raise ValueError(f"{path}: holds no 'config'; pass --config=<the training config>")
    return config_dict.ConfigDict(record["config"]), int(record["fold"])


def _read_run(path: str) -> dict:
    """run.json as a dict; a damaged one is a ValueError naming the file (json's own
    message says neither which file nor what to do)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged, not JSON ({e}); training writes it, so retrain "
                         "or restore the file") from None
    if not isinstance(record, dict) or "fold" not in record:
        raise ValueError(f"{path}: not a run record (no 'fold'); retrain or restore the file")
    return record


# What a --config may not change in a trained workdir: the fold set decides the novel
# classes, method and KIM which networks are built. A checkpoint restores into a model
# built without KIM or as a baseline (their variables are a subset of POPNet's), so
# without this check the numbers came out under the wrong name. Shapes (filters,
# backbone...) are refused by the restore itself; eval-time options
# (dynamic_prototypes, heads) may differ on purpose.
def _run_defining(record: dict) -> dict:
    """{dotted config field: value in training} of the fields a --config must keep
    (run.json's defaults for records older than a field)."""
    model = record.get("model") or {}
    return {"data.fold_set": record.get("fold_set", "paper"),
            "model.method": model.get("method", "popnet"), "model.kim": model.get("kim", True)}


def check_config_matches_run(workdir: str, config) -> None:
    """Refuses a --config that differs from the training's run.json in the fold set,
    the method or KIM (one ValueError naming the fields)."""
    from popnet_tf import train_lib  # train_lib imports this module

    path = os.path.join(workdir, train_lib.RUN_FILE)
    differences = []
    for dotted, was in _run_defining(_read_run(path)).items():
        section, key = dotted.split(".")
        asked = config[section].get(key, was)
        if asked != was:
            differences.append(f"{dotted}={was!r} in training, {asked!r} in --config")
    if differences:
        raise ValueError(f"{path}: --config does not match this workdir's training ("
                         + "; ".join(differences) + "); evaluate with the training's config "
                         "(leave --config out) or train another workdir")


def check_dataset(workdir: str, data_dir: str) -> None:
    """The dataset is intact (`integrity.verify_dataset`: a truncated shard used to end
    the evaluation in a DataLossError traceback) and, in the folder the workdir was
    trained on, still the dataset it was trained on (run.json's fingerprint, as training
    checks it): rebuilt there since (other seed, numbers, lists or images), its q_test may
    hold images the model was trained on, and the scores would look fine. Another folder,
    chosen with --config.data.dir, is scored with a warning: cross-dataset evaluation
    (say, a model trained on synthetic images scored on real ones) is a use, not a mistake.
    Workdirs without a record (older than it) are accepted."""
    from popnet_tf import train_lib  # train_lib imports this module

    manifest = integrity.verify_dataset(data_dir)
    path = os.path.join(workdir, train_lib.RUN_FILE)
    old = _read_run(path).get("dataset")
    if not old or not old.get("fingerprint"):
        return
    fingerprint = train_lib.dataset_fingerprint(manifest)
    if old["fingerprint"] == fingerprint:
        return
    if os.path.abspath(str(old.get("dir"))) == os.path.abspath(data_dir):
        raise integrity.RunConfigError(
            f"{path}: this workdir was trained on the dataset in {data_dir} (fingerprint "
            f"{old['fingerprint']}), which was rebuilt since (fingerprint {fingerprint}); "
            "its test images may be ones the model was trained on. Put the dataset it was "
            "trained on back, or retrain")
    logging.warning("%s: evaluating on %s, not the dataset the workdir was trained on (%s); "
                    "make sure its test images were not in that one's training splits",
                    workdir, data_dir, old.get("dir"))


def _count(value, default, field: str, minimum: int, meaning: str = "") -> int:
    """A count flag, or the config's `field` when the flag is not given (None), checked
    against its minimum; the error names whichever was used."""
    where = f"--{field.rsplit('.', 1)[1].replace('oneway_', '')}"
    if value is None:
        value, where = default, f"config.{field}"
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}={value!r}: must be an integer >= {minimum}{meaning}")
    return value


def _test_counts(config, max_queries, pairs_per_class, num_examples) -> tuple[int | None, int]:
    """(max_queries, pairs_per_class) with the config's defaults, checked: a negative
    --max_queries used to score every query (take(-1)), --pairs_per_class 0 to write an
    empty results.json over the previous one."""
    max_queries = _count(max_queries, config.eval.max_queries, "eval.max_queries", 0,
                         " (0 = all queries)")
    pairs_per_class = _count(pairs_per_class, config.eval.oneway_pairs_per_class,
                             "eval.oneway_pairs_per_class", 1)
    if num_examples < 0:
        raise ValueError(f"--num_examples={num_examples}: must be >= 0 (0: no gallery)")
    return max_queries or None, pairs_per_class


def eval_head(config) -> str:
    """The prediction head to score: config.eval.head for POPNet, the model's own
    prediction ("model") for a baseline."""
    method = config.model.get("method", "popnet")
    if config.eval.head not in PREDICTION_HEADS + ("model",):
        # Else _head_probs took any unknown name for the mean of both heads.
        raise ValueError(f"config.eval.head={config.eval.head!r}: choose one of "
                         f"{', '.join(PREDICTION_HEADS + ('model',))}")
    if method != "popnet":
        if config.eval.head != "model":
            logging.warning("eval.head=%r ignored: the %s baseline has its own prediction",
                            config.eval.head, method)
        return "model"
    return config.eval.head


# ----------------------------------------------------------------------------- Fine-tune
def _finetune_fns(model, learning_rate: float):
    """(restore, tune, predict) for test-time fine-tuning of a `FineTuneStage`.

    `tune(image [1,E,E,3], mask [1,E,E])` is one plain SGD step on the support's
    cross-entropy (BatchNorm in inference mode: one image gives no batch statistics);
    `restore()` puts back the D_train weights; `predict(images, presence)` gives
    probabilities [Q, E, E, C] with the support's classes only.
    """
    variables = model.finetune_variables()
    snapshot = [tf.identity(v) for v in variables]
    num_classes = model.num_classes

    def restore():
        for v, value in zip(variables, snapshot):
            v.assign(value)

    @tf.function(reduce_retracing=True)
    def tune(image, mask):
        presence = baselines.support_presence(mask, num_classes)
        with tf.GradientTape() as tape:
            features = model.infused_features(image, training=False)
            logits = model.heads(features, None, presence, image)["logits"]
            loss = tf.reduce_mean(losses.mean_cross_entropy(mask, logits))
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(learning_rate * g)
        return loss

    @tf.function(reduce_retracing=True)
    def predict(images, presence):
        features = model.infused_features(images, training=False)
        return model.heads(features, None, presence, images)["probs"]

    return restore, tune, predict


def finetune_kway(model, *, data_dir, stage, fold, fold_set="paper", eval_size, steps,
                  learning_rate, max_queries=None, query_batch=4, progress=True,
                  return_examples=0) -> dict:
    """K-way OSHP for the Fine-tune baseline: for each of the ten supports, tune
    `model.finetune_variables()` on it for `steps` SGD steps, score every query
    against it, restore. Same pairs, relabelling and metrics as
    `evaluate_kway` (support-major order; the confusion matrix does not
    depend on the order)."""
    supports = episodes.test_supports(data_dir, stage=stage, eval_size=eval_size)
    num_classes = classes.STAGE_NUM_CLASSES[stage]
    presence = baselines.support_presence(supports["mask"], num_classes)  # [S, C]
    num_supports = int(presence.shape[0])
    restore, tune, predict = _finetune_fns(model, learning_rate)
    queries = _first_queries(episodes.test_queries(data_dir, stage=stage, eval_size=eval_size),
                             max_queries)
    total = _known_length(queries)
    bar = Progbar(total and num_supports * total, unit_name="pair") if progress else None
    matrix = metrics.ConfusionMatrix(num_classes)
    absent_matrix = metrics.ConfusionMatrix(num_classes)
    examples, pairs = [], 0

    def score(batch, si, show):
        """Updates the matrix with a list of queries against support `si`."""
        nonlocal pairs
        images = tf.stack([q["image"] for q in batch])
        probs = predict(images, tf.repeat(presence[si:si + 1], len(batch), axis=0))
        for qi, query in enumerate(batch):
            label = tf.cast(query["label"], tf.int32)  # the k-way geometry and relabelling
            cm, absent_cm = _score_against_supports(
                probs[qi][None], query["valid_size"], label, presence[si:si + 1])
            matrix.matrix += cm.numpy()
            absent_matrix.matrix += absent_cm.numpy()
            if show and qi == 0 and len(examples) < return_examples:
                pred, truth = _example_pair(probs[qi], query["valid_size"], label, presence[si])
                examples.append(_example(supports["image"][si], supports["mask"][si],
                                         query["image"], truth, pred, query["valid_size"]))
            pairs += 1
            if bar:
                bar.update(pairs)

    try:
        for si in range(num_supports):
            for _ in range(steps):
                tune(supports["image"][si:si + 1], supports["mask"][si:si + 1])
            batch, first = [], True
            for query in queries:
                batch.append(query)
                if len(batch) == query_batch:
                    score(batch, si, first)
                    batch, first = [], False
            if batch:
                score(batch, si, first)
            restore()
    finally:
        restore()
    summary = _kway_results(matrix, absent_matrix, supports, stage, fold, fold_set,
                            num_pairs=pairs, head="model")
    if return_examples:
        summary["examples"] = examples
    return summary


def finetune_oneway(model, *, data_dir, stage, fold, fold_set="paper", eval_size, steps,
                    learning_rate, pairs_per_class=500, seed=0, progress=True,
                    return_examples=0) -> dict:
    """One-way OSHP for the Fine-tune baseline: each pair's model is tuned on its
    binary support for `steps` SGD steps, then predicts the query (as
    `evaluate_oneway` otherwise)."""
    pairs = episodes.test_episodes(data_dir, stage=stage, fold=fold, fold_set=fold_set,
                                   way="oneway", eval_size=eval_size,
                                   pairs_per_class=pairs_per_class, seed=seed)
    num_classes = classes.STAGE_NUM_CLASSES[stage]
    restore, tune, predict = _finetune_fns(model, learning_rate)
    matrices: dict[int, np.ndarray] = {}
    examples, shown, count = [], set(), 0
    bar = pair_progress_bar(pairs) if progress else None
    try:
        for pair in pairs:
            c = int(pair["class_id"])
            support_image, support_mask = pair["support_image"][None], pair["support_mask"][None]
            for _ in range(steps):
                tune(support_image, support_mask)
            presence = baselines.support_presence(support_mask, num_classes)
            probs = predict(pair["query_image"][None], presence)[0]
            restore()
            pred = _to_label_resolution(  # noqa: SLF001 - same geometry as one-way
                probs, pair["valid_size"], tf.shape(pair["query_label"]))
            truth = pair["query_label"]
            valid = truth != classes.IGNORE_LABEL
            binary_truth = tf.where(valid, tf.cast(truth == c, tf.int32), classes.IGNORE_LABEL)
            binary_pred = tf.cast(pred == c, tf.int32)
            matrices[c] = matrices.get(c, 0) + metrics.batch_confusion_matrix(
                binary_truth, binary_pred, 2).numpy()
            if len(examples) < return_examples and c not in shown:
                shown.add(c)
                examples.append(_example(pair["support_image"], pair["support_mask"],
                                         pair["query_image"], truth, binary_pred * c,
                                         pair["valid_size"]))
            count += 1
            if bar:
                bar.update(count)
    finally:
        restore()
    summary = metrics.oneway_summary(matrices, classes.novel_ids(stage, fold, fold_set),
                                     num_classes, classes.STAGE_CLASS_NAMES[stage])
    summary.update({"num_pairs": count, "head": "model"})
    if return_examples:
        summary["examples"] = examples
    return summary


def _example(support_image, support_mask, query_image, truth, prediction, valid_size) -> dict:
    return {"support_image": np.asarray(support_image), "support_mask": np.asarray(support_mask),
            "query_image": np.asarray(query_image), "truth": np.asarray(truth),
            "prediction": np.asarray(prediction), "valid_size": np.asarray(valid_size)}


# ----------------------------------------------------------------------------- evaluate
def evaluate(workdir: str, *, way: str = "kway", fold: int | None = None, config=None,
             stage: int = 3, max_queries: int | None = None, pairs_per_class: int | None = None,
             foreground_gate: bool | None = None, num_examples: int = 6, progress: bool = True,
             write: bool = True) -> dict:
    """Runs the SPEC §5 test protocol on a trained workdir and writes its outputs.

    Args:
        workdir: a training workdir (run.json, stage<N>/checkpoints).
        way: "kway" (every q_test query × the ten supports) or "oneway".
        fold: the fold; default and check: the one run.json records.
        config: the config; default: run.json's.
        stage: the one-shot stage to score (3: the 12 classes of SPEC §8; 2: areas).
        max_queries: k-way queries (None: config.eval.max_queries, 0 there = all).
        pairs_per_class: one-way pairs per class (None: config.eval.oneway_pairs_per_class).
        foreground_gate: gate the head by stage 1's human probability (None:
            config.eval.foreground_gate, False in configs older than the option).
        num_examples: episodes drawn in the gallery and TensorBoard.
        write: write results.json, table.md, gallery.png and TensorBoard.
    Returns:
        The results dict written to results.json (fractions 0–1).

    Example:
        >>> results = evaluate("workdirs/synthetic_cpu_fold1", way="oneway", pairs_per_class=50)
    """
    from popnet_tf import train_lib  # train_lib imports this module

    if way not in WAYS:
        raise ValueError(f"--way must be one of {WAYS}, got {way!r}")
    if stage not in (2, 3):
        raise ValueError(f"--stage must be 2 or 3 (the one-shot stages), got {stage!r}")
    recorded, recorded_fold = load_run(workdir)
    if config is not None:
        check_config_matches_run(workdir, config)
    config = config if config is not None else recorded
    fold = recorded_fold if fold is None else int(fold)
    if fold != recorded_fold:
        raise ValueError(f"{workdir}/run.json: this workdir was trained on fold {recorded_fold}, "
                         f"not fold {fold}; novel classes would be wrong. Use --fold {recorded_fold}")
    method = config.model.get("method", "popnet")
    head = eval_head(config)
    max_queries, pairs_per_class = _test_counts(config, max_queries, pairs_per_class, num_examples)
    if foreground_gate is None:
        foreground_gate = bool(config.eval.get("foreground_gate", False))
    if foreground_gate and method != "popnet":
        raise ValueError(f"--foreground_gate needs POPNet's stage 1; the {method} baseline "
                         "has none")
    data_dir = train_lib.ensure_dataset(config)
    check_dataset(workdir, data_dir)
    if write:  # an unwritable output folder fails now, not after the whole evaluation
        integrity.check_workdir(eval_dir(workdir, fold, way, foreground_gate, stage))
    checkpoint = tf.train.latest_checkpoint(train_lib.checkpoint_dir(workdir, stage))
    if checkpoint is None:
        raise FileNotFoundError(f"{train_lib.checkpoint_dir(workdir, stage)}: no checkpoint; "
                                f"train stage {stage} first")
    finished = train_lib.stage_finished(workdir, stage)
    if not finished:
        logging.warning("%s: stage %d has not finished training; evaluating its latest "
                        "checkpoint %s", workdir, stage, checkpoint)
    start = time.time()
    # The checkpoint recorded in the results, not a newer one a training saved meanwhile.
    model = train_lib.restore_stage(config, workdir, stage, checkpoint=checkpoint)
    common = dict(data_dir=data_dir, stage=stage, fold=fold, fold_set=config.data.fold_set,
                  eval_size=config.data.eval_size, progress=progress, return_examples=num_examples)
    logging.info("Evaluating %s (%s, stage %d, fold %d, %s, head %s)", workdir, method, stage,
                 fold, way, head)
    if method == "finetune":
        tuning = dict(steps=config.eval.finetune_steps,
                      learning_rate=config.eval.finetune_learning_rate)
        if way == "kway":
            summary = finetune_kway(model, max_queries=max_queries, **tuning, **common)
        else:
            summary = finetune_oneway(model, pairs_per_class=pairs_per_class, seed=config.seed,
                                      **tuning, **common)
    elif way == "kway":
        summary = evaluate_kway(model, head=head, foreground_gate=foreground_gate,
                                         max_queries=max_queries, **common)
    else:
        summary = evaluate_oneway(model, head=head, foreground_gate=foreground_gate,
                                           pairs_per_class=pairs_per_class,
                                           seed=config.seed, **common)
    examples = summary.pop("examples", [])
    results = {
        **summary,
        "method": method, "way": way, "stage": stage, "fold": fold,
        "foreground_gate": bool(foreground_gate),
        "fold_set": config.data.fold_set, "seed": config.seed,
        "max_queries": max_queries or 0,
        "pairs_per_class": pairs_per_class if way == "oneway" else None,
        "checkpoint": checkpoint, "workdir": workdir, "data_dir": data_dir,
        # The results of a stage still training say so themselves, not only the log.
        "stage_finished": bool(finished),
        "wall_time_s": round(time.time() - start, 1),
        "config": config.to_dict(),
    }
    if write:
        write_outputs(results, examples, workdir)
    return results


def format_results(results: dict) -> str:
    """The Markdown table of a results dict (percent), with a line saying what it is."""
    title = f"{results['method']} fold {results['fold']} {results['way']}"
    gate = ", gated by stage 1's foreground" if results.get("foreground_gate") else ""
    note = (f"{results['num_pairs']} pairs, head {results['head']}{gate}, stage {results['stage']}, "
            f"checkpoint `{results['checkpoint']}`")
    table = f"{note}\n\n{metrics.format_table(results, title)}"
    if results.get("error_breakdown"):  # k-way
        table += ("\nWhere each class's IoU goes (% of its union TP + FN + FP; a pixel of a "
                  "class the support does not hold is background in the truth, SPEC §5):\n\n"
                  + metrics.format_error_breakdown(results["error_breakdown"]))
    return table


def write_outputs(results: dict, examples: list, workdir: str) -> str:
    """results.json, table.md, gallery.png under W/eval/fold<F>_<way>/ and the metrics
    and gallery rows in TensorBoard. Returns the folder."""
    from popnet_tf import train_lib  # train_lib imports this module

    out_dir = eval_dir(workdir, results["fold"], results["way"], results.get("foreground_gate", False),
                       results.get("stage", 3))
    os.makedirs(out_dir, exist_ok=True)
    train_lib.write_json_atomic(os.path.join(out_dir, RESULTS_FILE), results)
    train_lib.write_atomic(os.path.join(out_dir, TABLE_FILE), format_results(results))
    writer = tf.summary.create_file_writer(
        os.path.join(workdir, "tensorboard", "eval_" + os.path.basename(out_dir)))
    with writer.as_default(step=0):
        for key in ("novel_miou", "base_miou", "human_miou", "overall_acc", "bi_iou"):
            value = results.get(key)
            if value is not None and np.isfinite(value):
                tf.summary.scalar(f"eval/{key}", value)
    if examples:
        from popnet_tf.data import show  # colours and legend live with the data viewer

        stage = results["stage"]
        names = classes.STAGE_CLASS_NAMES[stage]
        captions = [_caption(e, names) for e in examples]
        gallery = io.BytesIO()
        show.render_grid(examples, stage, captions).save(gallery, format="PNG")
        train_lib.write_atomic(os.path.join(out_dir, GALLERY_FILE), gallery.getvalue())
        with writer.as_default(step=0):
            rows = np.stack([show.episode_panel(e, stage) for e in examples])
            tf.summary.image("eval/episodes", rows, max_outputs=len(examples))
    elif os.path.exists(os.path.join(out_dir, GALLERY_FILE)):
        # --num_examples 0: a gallery of an earlier evaluation would sit beside these results.
        os.remove(os.path.join(out_dir, GALLERY_FILE))
    writer.flush()
    return out_dir


def _caption(example: dict, names) -> str:
    present = sorted(set(np.unique(example["support_mask"]).tolist()) - {0, classes.IGNORE_LABEL})
    return "support: " + ", ".join(names[c] for c in present if c < len(names))
