"""Progressive training of POPNet (SPEC §6, §7): stage 1 → 2 → 3, custom loop.

One straight path: config → data (built on demand) → model (previous stages
restored and frozen) → `tf.function` step under a `tf.distribute` strategy →
checkpoints every epoch → TensorBoard → evaluation.

Workdir layout:
    W/run.json                       fold, fold set and config of the run
    W/stage<N>/checkpoints/          tf.train.CheckpointManager (model with the
                                     prototype store, optimizer, epoch, step, β)
    W/stage<N>/result.json           written when the stage has finished
    W/tensorboard/stage<N>/          scalars and images

Example:
    >>> from configs import synthetic_cpu
    >>> summary = train(synthetic_cpu.get_config(), "workdirs/fold1", stage=3, fold=1)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from popnet_tf import classes, eval_lib, integrity, losses, metrics
from popnet_tf.data import augment, episodes
from popnet_tf.models import baselines, popnet
from popnet_tf.models.stages import PREDICTION_HEADS

RUN_FILE = "run.json"
RESULT_FILE = "result.json"


# ----------------------------------------------------------------------------- paths
def stage_dir(workdir: str, stage: int) -> str:
    return os.path.join(workdir, f"stage{stage}")


def checkpoint_dir(workdir: str, stage: int) -> str:
    return os.path.join(stage_dir(workdir, stage), "checkpoints")


def tensorboard_dir(workdir: str, stage: int) -> str:
    return os.path.join(workdir, "tensorboard", f"stage{stage}")


def stage_finished(workdir: str, stage: int) -> bool:
    return os.path.exists(os.path.join(stage_dir(workdir, stage), RESULT_FILE))


def write_atomic(path: str, data) -> None:
    """Writes `data` (str or bytes) aside and renames it into place: a reader never sees
    half a file, and a failed write (full disk) leaves the previous file and no temporary."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, payload: dict) -> None:
    """`payload` as JSON, written atomically (`write_atomic`). Strict JSON: an undefined
    metric (NaN, e.g. novel MIoU when no novel class is in the test data) is written as
    null, as per_class_iou already writes it."""
    write_atomic(path, json.dumps(_finite_json(payload), indent=2, sort_keys=True,
                                  default=_json_default, allow_nan=False))


def _finite_json(value):
    """`value` with every non-finite float (NaN, ±Inf, NumPy ones too) replaced by None."""
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite_json(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ----------------------------------------------------------------------------- data
def check_dataset_present(config) -> None:
    """Raises `integrity.DatasetMissingError` when the config's dataset is neither built
    nor the synthetic one (generated on first use): before anything is written."""
    data_dir = config.data.dir
    if os.path.exists(os.path.join(data_dir, "manifest.json")):
        return
    # The ATR download itself, given as the dataset: say to build it (the synthetic default
    # would otherwise generate images beside it, then fail with a traceback).
    if os.path.isdir(os.path.join(data_dir, "JPEGImages")):
        built = data_dir.rstrip("/") + "_atr_os"
        raise integrity.DatasetMissingError(
            f"{data_dir}: an ATR-layout folder (JPEGImages/, SegmentationClassAug/), not a built "
            f"ATR-OS dataset (no manifest.json). Build one from it first: python -m "
            f"popnet_tf.data.build_atr_os --atr_root {data_dir} --out {built}, then train with "
            f"--config.data.dir={built}")
    if config.data.synthetic and os.path.isdir(data_dir) and os.listdir(data_dir):
        raise integrity.DatasetMissingError(
            f"{data_dir}: not empty and holds no manifest.json, so it is no built dataset, and the "
            "synthetic one is only generated into a new or empty folder. Point "
            "--config.data.dir at a built dataset (python -m popnet_tf.data.build_atr_os "
            "--atr_root ... --out DIR) or at a new folder")
    if not config.data.synthetic:
        raise integrity.DatasetMissingError(
            f"{data_dir}: no manifest.json. Build the dataset first: "
            f"python -m popnet_tf.data.build_atr_os --atr_root /path/to/ATR --out {data_dir} "
            "(or point --config.data.dir at a built one)")


def ensure_dataset(config) -> str:
    """The built ATR-OS dataset of the config; the synthetic one is generated and
    built on first use. Returns its folder."""
    data_dir = config.data.dir
    if os.path.exists(os.path.join(data_dir, "manifest.json")):
        return data_dir
    check_dataset_present(config)
    # Two runs (fold 1 and fold 2 started together) would both generate and build it,
    # one swapping its folder under the other's reads: one builds, the other waits.
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(integrity.dataset_lock(data_dir))
        except OSError as e:  # the lock file goes beside the folder: it must be writable
            raise integrity.WorkdirError(
                f"{data_dir}: cannot write in its folder to build the dataset ({e.strerror or e}: "
                f"{e.filename}); choose a writable --config.data.dir") from None
        if os.path.exists(os.path.join(data_dir, "manifest.json")):
            logging.info("%s: built by the process waited for; using it.", data_dir)
            return data_dir
        check_dataset_present(config)
        _generate_and_build(config, data_dir)
    return data_dir


def _generate_and_build(config, data_dir: str) -> None:
    # Imported here: only the synthetic default needs the generator and builder.
    from popnet_tf.data import build_atr_os, synth

    raw_dir = config.data.synthetic_atr_dir or f"{data_dir.rstrip('/')}_atr"
    n = config.data.synthetic_num_images
    logging.info("No dataset at %s: generating %d synthetic ATR images in %s, then building it.",
                 data_dir, n, raw_dir)
    synth.generate(raw_dir, n, config.data.synthetic_seed)
    build_atr_os.build(raw_dir, data_dir,
                       num_query_train=config.data.num_query_train,
                       num_test_query=config.data.num_test_query,
                       num_test_support=config.data.num_test_support,
                       num_test=config.data.num_test_query + config.data.num_test_support,
                       seed=config.data.synthetic_seed)


def epoch_dataset(config, data_dir: str, stage: int, fold: int, epoch: int) -> tf.data.Dataset:
    """The batches of one epoch, a function of (seed, epoch) alone, so a resumed run
    sees exactly the batches an uninterrupted run would."""
    d, t = config.data, config.train
    seed = config.seed * 100003 + stage * 1009 + epoch
    common = dict(batch_size=batch_size(config, stage), scale_range=tuple(d.scale_range),
                  resize_long_side=d.resize_long_side or None, seed=seed,
                  cache_decoded=bool(d.cache_decoded))
    if stage == 1:
        ds = episodes.stage1_train_dataset(data_dir, crop_size=crop_size(config, 1), **common)
    else:
        ds = episodes.train_episodes(data_dir, stage=stage, fold=fold, fold_set=d.fold_set,
                                     way=t.way, crop_size=crop_size(config, stage),
                                     support_crop_size=support_crop_size(config, stage), **common)
    return ds.take(steps_per_epoch(config, stage))


def crop_size(config, stage: int) -> int | tuple[int, int]:
    """Training crop of a stage, a side S or (rows, cols). The one-shot stages use the
    k-way crop (`data.crop_size` x `data.crop_width`, square when the width is 0) or
    the one-way crop (square). Stage 1 (supervised, cheap per pixel) may have its own:
    `data.stage1_crop_size` rows x `data.stage1_crop_width` columns (0: square); with
    `stage1_crop_size` 0 it takes the k-way crop (its width too, unless it has its own)."""
    d = config.data
    if stage == 1 and d.stage1_crop_size:
        rows, cols = d.stage1_crop_size, d.stage1_crop_width or d.stage1_crop_size
    elif stage == 1:
        rows, cols = d.crop_size, d.stage1_crop_width or d.crop_width or d.crop_size
    elif config.train.way == "kway":
        rows, cols = d.crop_size, d.crop_width or d.crop_size
    else:
        return d.oneway_crop_size
    return rows if rows == cols else (rows, cols)


def support_crop_size(config, stage: int) -> int | tuple[int, int] | None:
    """The k-way supports' own training crop, `data.support_crop_size` rows x
    `data.support_crop_width` columns (0: square; the width alone: the query's rows), in
    the stages of `data.support_crop_stages` (default: stage 3 only); None: the query's
    crop (the default, and always for stage 1, one-way and the other stages).

    Why: the ten fixed test supports are whole images holding 8-9 classes, while a
    support cropped like the queries holds fewer, and NCM's background score averages
    over the classes present (SPEC §6); a whole-image support crop trains with test-like
    supports. Measured, it helps stage 3 trained over a stage 2 without it, and lowers
    both when stage 2 has it too (README, "What the default run measures")."""
    d = config.data
    rows, cols = d.get("support_crop_size", 0), d.get("support_crop_width", 0)
    stages = tuple(d.get("support_crop_stages", (3,)))
    if stage not in stages or config.train.way != "kway" or not (rows or cols):
        return None
    query_rows = augment.crop_shape(crop_size(config, stage))[0]
    rows = rows or query_rows
    cols = cols or rows
    return rows if rows == cols else (rows, cols)


def batch_size(config, stage: int) -> int:
    """Global batch of a stage: stage 1 may have its own (cheap, supervised)."""
    if stage == 1 and config.train.stage1_batch_size:
        return config.train.stage1_batch_size
    return config.train.batch_size


def steps_per_epoch(config, stage: int) -> int:
    """Steps of one epoch: stage 1 may have its own count (it is cheap and supervised)."""
    if stage == 1 and config.train.stage1_steps_per_epoch:
        return config.train.stage1_steps_per_epoch
    return config.train.steps_per_epoch


# ----------------------------------------------------------------------------- schedule
class BetaSchedule(keras.callbacks.Callback):
    """Weight shifting (SPEC §6): β = 1 − epoch / max_epoch at each epoch start,
    or a constant β for the ablations (1: AGM only, 0: NCM only, 0.5: DML)."""

    def __init__(self, beta: tf.Variable, epochs: int, schedule: str = "shift", constant: float = 0.5):
        super().__init__()
        if schedule not in ("shift", "constant"):
            raise ValueError(f"beta schedule must be 'shift' or 'constant', got {schedule!r}")
        self.beta, self.epochs, self.schedule, self.constant = beta, epochs, schedule, constant

    def value(self, epoch: int) -> float:
        return 1.0 - epoch / self.epochs if self.schedule == "shift" else float(self.constant)

    def on_epoch_begin(self, epoch, logs=None):
        self.beta.assign(self.value(epoch))


class PrototypeWarmup(keras.callbacks.Callback):
    """Static prototypes for the first `warmup` epochs while the store fills,
    dynamic ones after (SPEC §6); never dynamic when the ablation turns DP off."""

    def __init__(self, use_dynamic: tf.Variable, warmup: int, enabled: bool = True):
        super().__init__()
        self.use_dynamic, self.warmup, self.enabled = use_dynamic, warmup, enabled

    def on_epoch_begin(self, epoch, logs=None):
        self.use_dynamic.assign(bool(self.enabled and epoch >= self.warmup))


def make_optimizer(config, total_steps: int) -> keras.optimizers.Optimizer:
    """SGD with momentum, weight decay and poly learning-rate decay (SPEC §7)."""
    t = config.train
    schedule = keras.optimizers.schedules.PolynomialDecay(
        t.learning_rate, decay_steps=max(total_steps, 1), end_learning_rate=0.0, power=t.poly_power)
    # Optional moving average of the weights, swapped in when a stage ends (train_stage).
    ema = {"use_ema": bool(t.ema_momentum), "ema_momentum": float(t.ema_momentum or 0.99)}
    if t.optimizer == "sgd":
        # The paper's "weight decay 5e-4" is the L2 term of its SGD (PyTorch, as TF DeepLab's
        # regulariser): wd·w joins the gradient before momentum. Keras' `weight_decay` is
        # decoupled (w -= lr·wd·w, outside momentum), ~1/(1 - momentum) = 10x weaker here.
        # make_train_step adds the L2 term to the loss (`l2_weight_decay`).
        opt = keras.optimizers.SGD(schedule, momentum=t.momentum, **ema)
        opt.l2_weight_decay = float(t.weight_decay)
    elif t.optimizer == "adamw":
        opt = keras.optimizers.AdamW(schedule, weight_decay=t.weight_decay, **ema)
    else:
        raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {t.optimizer!r}")
    if precision_policy(t.mixed_precision) == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)  # float16 gradients need loss scaling
    return opt


def tf_config_cluster() -> tuple[int, str | None, int, bool]:
    """(workers in the cluster, this task's type, its index, whether the cluster names a
    chief) from the TF_CONFIG variable that a multi-host launcher sets; (0, None, 0,
    False) without one."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = tf_config.get("cluster", {})
    task = tf_config.get("task", {})
    workers = sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))
    return workers, task.get("type"), int(task.get("index", 0)), bool(cluster.get("chief"))


def is_chief() -> bool:
    """Whether this process writes the run's files: always, but in a multi-worker cluster
    only the chief (the `chief` task, else worker 0)."""
    workers, task_type, index, has_chief = tf_config_cluster()
    if workers <= 1 or task_type is None:
        return True
    return task_type == "chief" or (task_type == "worker" and index == 0 and not has_chief)


def worker_workdir(workdir: str) -> str:
    """Where this process writes: the workdir on the chief (or a single process); on
    another worker of a multi-worker cluster its own folder `<workdir>/workers/<type><index>`.
    Every worker saves each checkpoint (the save is collective) but only the chief's
    are the run's, and two workers must not write the same files."""
    if is_chief():
        return workdir
    _, task_type, index, _ = tf_config_cluster()
    return os.path.join(workdir, "workers", f"{task_type}{index}")


def strategy_name(name: str) -> str:
    """The strategy `train.strategy` resolves to: `auto` is `multiworker` when TF_CONFIG
    names a cluster of several workers, `mirrored` with several local GPUs, else `default`."""
    if name != "auto":
        return name
    if tf_config_cluster()[0] > 1:  # read before anything initialises TensorFlow's context
        return "multiworker"
    return "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "default"


_MULTI_WORKER = []  # the process's one MultiWorkerMirroredStrategy


def get_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy of `train.strategy` (see `strategy_name`).

    MultiWorkerMirroredStrategy configures collective ops, which TensorFlow allows only
    before its context is initialised (before the first op): `train` therefore calls this
    first, and the strategy is made once per process and reused by every stage."""
    name = strategy_name(name)
    if name == "multiworker":
        if not _MULTI_WORKER:
            _MULTI_WORKER.append(tf.distribute.MultiWorkerMirroredStrategy())
        return _MULTI_WORKER[0]
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "default":
        return tf.distribute.get_strategy()
    raise ValueError(f"train.strategy must be auto, mirrored, multiworker or default, got {name!r}")


# ----------------------------------------------------------------------------- config
# The values each enumerated config field accepts, checked before any work.
CONFIG_CHOICES = {
    "train.optimizer": ("sgd", "adamw"),
    "train.strategy": ("auto", "mirrored", "multiworker", "default"),
    "train.beta_schedule": ("shift", "constant"),
    "train.mixed_precision": ("float32", "mixed_float16", "mixed_bfloat16", "auto"),
    "train.way": ("kway", "oneway"),
    "model.method": ("popnet",) + baselines.METHODS,
    "model.prediction_head": PREDICTION_HEADS,
    "eval.head": PREDICTION_HEADS + ("model",),
}
# Fields that must be integers >= 1; those of _ZERO_MEANS_DEFAULT may also be 0 ("as the
# general field": batch_size, steps_per_epoch, crop_size).
_POSITIVE = ("train.batch_size", "train.epochs", "train.stage1_epochs", "train.steps_per_epoch",
             "data.crop_size",
             "data.oneway_crop_size", "data.eval_size", "model.filters")
_ZERO_MEANS_DEFAULT = ("train.stage1_batch_size", "train.stage1_steps_per_epoch",
                       "data.stage1_crop_size", "data.stage1_crop_width", "data.crop_width",
                       "data.support_crop_size", "data.support_crop_width")


def _field(config, dotted):
    section, key = dotted.split(".")
    return config[section][key]


def check_config(config) -> None:
    """Every problem of a config in one `RunConfigError`, before any data or model work:
    an unknown choice (optimizer, strategy, β schedule, precision, backbone, method,
    head, fold set), a non-positive size or count, α outside (0, 1].

    Example:
        >>> config = synthetic_cpu.get_config(); config.train.optimizer = "adam"
        >>> check_config(config)  # RunConfigError: train.optimizer='adam': choose one of ...
    """
    from popnet_tf.models import backbones

    choices = {**CONFIG_CHOICES, "model.backbone": backbones.BACKBONE_NAMES,
               "data.fold_set": tuple(classes.FOLDS)}
    problems = []
    for dotted, allowed in choices.items():
        value = _field(config, dotted)
        if value not in allowed:
            problems.append(f"{dotted}={value!r}: choose one of {', '.join(map(str, allowed))}")
    for dotted in _POSITIVE + _ZERO_MEANS_DEFAULT:
        value = _field(config, dotted)
        low = 0 if dotted in _ZERO_MEANS_DEFAULT else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            problems.append(f"{dotted}={value!r}: must be an integer >= {low}")
    if not 0.0 < float(config.model.momentum) <= 1.0:
        problems.append(f"model.momentum={config.model.momentum!r}: α of Eq. 2 must be in (0, 1]")
    if not 0.0 <= float(config.train.ema_momentum) < 1.0:
        problems.append(f"train.ema_momentum={config.train.ema_momentum!r}: must be in [0, 1) "
                        "(0: no moving average)")
    stages = config.data.get("support_crop_stages", ())
    if not isinstance(stages, (tuple, list)) or not set(stages) <= {2, 3}:
        problems.append(f"data.support_crop_stages={stages!r}: a tuple of one-shot stages, "
                        "from (2, 3)")
    if float(config.train.learning_rate) < 0:
        problems.append(f"train.learning_rate={config.train.learning_rate!r}: must be >= 0")
    if int(config.train.prototype_warmup) < 0:
        problems.append(f"train.prototype_warmup={config.train.prototype_warmup!r}: must be >= 0")
    if problems:
        raise integrity.RunConfigError("bad config: " + "; ".join(problems))


def check_backbone_weights(config) -> None:
    """Raises `integrity.RunConfigError` (one line naming the file and the problem) when
    `model.backbone_weights` is set but does not load into the config's backbone: missing,
    not a .weights.h5 file, unreadable, or saved from another backbone. Before anything
    is written: a failed run used to leave run.json recording the bad path, and the
    workdir then refused the corrected run."""
    path = config.model.backbone_weights
    if not path:
        return
    from popnet_tf.models import backbones, popnet

    kwargs = popnet.encoder_kwargs(config)
    try:
        backbones.build_backbone(kwargs["backbone"], weights=path, dtype="float32",
                                 **kwargs["backbone_kwargs"])
    except (ValueError, OSError, TypeError) as e:
        message = " ".join(str(e).split())
        # The remedy in the user's own terms: on the command line the library's
        # `weights=None` is an empty config value.
        raise integrity.RunConfigError(
            f"model.backbone_weights: {message} To train from random initialisation, leave "
            "it empty (--config.model.backbone_weights=).") from None


# ----------------------------------------------------------------------------- models
def check_run_record(config, workdir: str, fold: int) -> None:
    """Refuses a workdir trained on another fold or class set (before any work)."""
    path = os.path.join(workdir, RUN_FILE)
    record = {"fold": fold, "fold_set": config.data.fold_set,
              "class_names": list(classes.MERGED_NAMES), "model": config.model.to_dict()}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for key in ("fold", "fold_set", "class_names", "model"):
            differences = _differences(old.get(key), json.loads(json.dumps(record[key])), key)
            if differences:
                was = ", ".join(f"{name}={a!r}" for name, a, _ in differences)
                asks = ", ".join(f"{name}={b!r}" for name, _, b in differences)
                raise integrity.RunConfigError(
                    f"{path}: this workdir was trained with {was}, but this run asks for "
                    f"{asks}; use another --workdir")
        return
    write_json_atomic(path, {**record, "config": config.to_dict()})


def dataset_fingerprint(manifest: dict) -> str:
    """A short digest of a built dataset's content: its shards' sha256 per split and
    its test supports (the same data moved to another folder keeps it)."""
    import hashlib

    parts = {split: sorted(entry.get("shards", {}).values())
             for split, entry in sorted(manifest["splits"].items())}
    parts["test_supports"] = manifest.get("test_supports")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def check_dataset_record(workdir: str, data_dir: str, manifest: dict) -> None:
    """Refuses to continue a workdir on another dataset than the one it was trained on.

    The first run records the dataset (folder and fingerprint) in run.json. A later run
    (`--resume`, or a later stage) on a dataset of another content is refused in one
    line; the same dataset in another folder is accepted and run.json then names the
    new folder, which evaluation and export read.
    """
    path = os.path.join(workdir, RUN_FILE)
    with open(path) as f:
        record = json.load(f)
    fingerprint = dataset_fingerprint(manifest)
    old = record.get("dataset")
    if old and old.get("fingerprint") != fingerprint:
        raise integrity.RunConfigError(
            f"{path}: this workdir was trained on the dataset {old.get('dir')} (fingerprint "
            f"{old.get('fingerprint')}), but --config.data.dir {data_dir} holds another dataset "
            f"(fingerprint {fingerprint}); point --config.data.dir at the dataset it was "
            "trained on, or use another --workdir")
    if old == {"dir": data_dir, "fingerprint": fingerprint}:
        return
    if old:
        logging.info("%s: the dataset moved from %s to %s (same content); run.json now names it.",
                     workdir, old.get("dir"), data_dir)
    record["dataset"] = {"dir": data_dir, "fingerprint": fingerprint}
    record.setdefault("config", {}).setdefault("data", {})["dir"] = data_dir
    write_json_atomic(path, record)


class _Absent:
    """A field one side of a comparison lacks."""

    def __repr__(self):
        return "(absent)"


_MISSING = _Absent()


def _differences(old, new, name: str) -> list[tuple[str, object, object]]:
    """(dotted name, old, new) of every leaf where two JSON values differ, so that a
    refusal names the few model fields that changed rather than the whole section."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(key, _MISSING), new.get(key, _MISSING),
                                      f"{name}.{key}")]
    return [] if old == new else [(name, old, new)]  # _MISSING equals only itself


def restore_stage(config, workdir: str, stage: int, strategy=None,
                  checkpoint: str | None = None) -> keras.Model:
    """A finished stage (and the stages before it) rebuilt and restored, frozen.
    `checkpoint`: the one of `stage` to restore (default its latest); a reader of a
    workdir still training passes the one it records, since a save may land between."""
    previous = None
    needed = popnet.stages_needed(config, stage)
    if config.model.backbone_weights:
        # The checkpoint holds every weight: the backbone weight file only starts a
        # training, and a finished workdir must not depend on it still being there.
        config = copy.deepcopy(config)
        config.model.backbone_weights = ""
    for s in needed:
        # Seeded as in train_stage: the frozen stage's dropout seed generators (not in
        # its checkpoint) get the same seeds in every process, so the next stage's
        # checkpoints are identical between an uninterrupted and a resumed run.
        keras.utils.set_random_seed(config.seed + s)
        model = popnet.build_stage(config, s, previous=previous)
        popnet.build_variables(model, s, config.data.crop_size)
        latest = (checkpoint if s == stage and checkpoint else
                  tf.train.latest_checkpoint(checkpoint_dir(workdir, s)))
        if latest is None:
            raise FileNotFoundError(f"{checkpoint_dir(workdir, s)}: no checkpoint of stage {s}")
        try:
            tf.train.Checkpoint(model=model).restore(latest).expect_partial().assert_existing_objects_matched()
        except (tf.errors.OpError, IndexError, AssertionError, ValueError) as e:
            # A truncated or damaged file raises IndexError or DataLoss; another model's, AssertionError.
            detail = (getattr(e, "message", None) or str(e) or type(e).__name__).strip().splitlines()
            raise ValueError(f"{latest}: cannot restore stage {s} from this checkpoint: damaged, "
                             f"incomplete or of another config ({detail[0] if detail else type(e).__name__})"
                             ) from None
        previous = model
    return previous


# ----------------------------------------------------------------------------- steps
def _stage1_loss(model, batch, global_batch):
    out = model(batch["image"], training=True)
    per_sample = losses.mean_cross_entropy(batch["mask"], out["logits"])
    loss = tf.reduce_sum(per_sample) / global_batch
    return loss, {"loss": loss}


def _oneshot_loss(model, batch, global_batch, beta, use_dynamic):
    out = model(batch, training=True, use_dynamic=use_dynamic)
    parts = losses.dual_metric_loss(batch["query_mask"], out["agm_logits"], out["ncm_logits"], beta)
    if "extra_loss" in out:  # a baseline's own term [B], e.g. PANet's alignment loss
        parts["extra"] = tf.cast(out["extra_loss"], tf.float32)
        parts["total"] = parts["total"] + parts["extra"]
    scaled = {k: tf.reduce_sum(v) / global_batch for k, v in parts.items()}
    logs = {"loss": scaled["total"], "agm_loss": scaled["agm"], "ncm_loss": scaled["ncm"]}
    if "extra" in scaled:
        logs["extra_loss"] = scaled["extra"]
    return scaled["total"], logs


def _prototype_store_variables(model) -> list:
    """The variables of the model's prototype stores (Eq. 2), written by the forward pass."""
    from popnet_tf.layers.prototypes import PrototypeStore

    return [v for layer in model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, PrototypeStore) for v in (layer.prototypes, layer.seen)]


def _l2_weight_decay(optimizer) -> float:
    return getattr(getattr(optimizer, "inner_optimizer", optimizer), "l2_weight_decay", 0.0)


def weight_decay_loss(optimizer, variables):
    """½·wd·Σ‖w‖², the L2 term of an optimizer from `make_optimizer` that decays through
    the loss (SGD); 0.0 for one with Keras' decoupled decay (AdamW). Add it to the loss
    of a custom loop (make_train_step does, divided among the replicas)."""
    l2 = _l2_weight_decay(optimizer)
    if not l2:
        return 0.0
    return 0.5 * l2 * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32)))
                                for v in variables])


def make_train_step(model, optimizer, strategy, stage, global_batch, beta, use_dynamic, jit_compile):
    """A distributed `tf.function` training step returning the summed losses.

    Under `mixed_float16` the `LossScaleOptimizer` skips a step whose gradients are not
    finite (and halves the loss scale); the prototype store, which the forward pass has
    already updated, is then put back as it was, so a skipped step leaves no trace."""
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    stores = _prototype_store_variables(model) if loss_scaled else []
    l2 = _l2_weight_decay(optimizer)

    def replica_step(batch):
        before = [tf.identity(v) for v in stores]  # read before the forward pass writes
        with tf.GradientTape() as tape:
            if stage == 1:
                loss, logs = _stage1_loss(model, batch, global_batch)
            else:
                loss, logs = _oneshot_loss(model, batch, global_batch, beta, use_dynamic)
            if l2:  # SGD's coupled weight decay: gradient wd·w, split among the replicas
                replicas = tf.distribute.get_replica_context().num_replicas_in_sync
                loss += weight_decay_loss(optimizer, model.trainable_variables) / replicas
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        if loss_scaled:
            finite = optimizer.check_finite(grads)
            context = tf.distribute.get_replica_context()
            if context.num_replicas_in_sync > 1:
                # Keras' LossScaleOptimizer decides from the first replica's own gradients
                # (not yet all-reduced): one replica's overflow would then be applied, and
                # the sum make every weight NaN. All replicas take the same verdict here,
                # and a skipped step gives every replica non-finite gradients.
                bad = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                         tf.cast(tf.logical_not(finite), tf.float32))
                finite = tf.equal(bad, 0.0)
                poison = tf.where(finite, 0.0, float("nan"))
                grads = [None if g is None else tf.convert_to_tensor(g) + tf.cast(poison, g.dtype)
                         for g in grads]
            for v, old in zip(stores, before):
                v.assign(tf.where(finite, tf.convert_to_tensor(v), old))
        optimizer.apply(grads, variables)
        return logs

    @tf.function(jit_compile=jit_compile)
    def step(batch):
        logs = strategy.run(replica_step, args=(batch,))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in logs.items()}

    return step


def _seed_states(model: keras.Model) -> list:
    """The states of the model's random seed generators (dropout): checkpointed so a
    resumed run draws the same dropout masks as an uninterrupted one."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


class Preempted(Exception):
    pass


# ----------------------------------------------------------------------------- training
def train_stage(config, workdir: str, stage: int, fold: int, data_dir: str,
                resume: bool = False, previous=None) -> dict:
    """Trains one stage to the end (or resumes it), checkpointing every epoch.
    Returns the stage's evaluation summary, also written to stage<N>/result.json."""
    t = config.train
    strategy = get_strategy(t.strategy)
    epochs = t.stage1_epochs if stage == 1 else t.epochs
    steps = steps_per_epoch(config, stage)
    total_steps = epochs * steps
    global_batch = batch_size(config, stage)
    keras.utils.set_random_seed(config.seed + stage)

    with strategy.scope():
        model = popnet.build_stage(config, stage, previous=previous)
        popnet.build_variables(model, stage, config.data.crop_size)
        if config.model.get("init_from_previous") and previous is not None:
            popnet.init_encoder_from(model, previous)  # a resumed run restores over it
        popnet.configure_batch_norm(model, config.model.bn_momentum,
                                    synchronized=strategy.num_replicas_in_sync > 1)
        optimizer = make_optimizer(config, total_steps)
        optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        beta = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="beta")
        use_dynamic = tf.Variable(False, dtype=tf.bool, trainable=False, name="use_dynamic")

    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var,
                               step_in_epoch=step_var, beta=beta, rng=_seed_states(model))
    # Refuses to start without disk room, never saves NaN, cleans failed saves (integrity).
    manager = integrity.CheckedCheckpointManager(
        ckpt, checkpoint_dir(workdir, stage), max_to_keep=t.checkpoints_to_keep,
        variables=[*model.variables, *optimizer.variables], what=f"stage {stage}")
    if manager.latest_checkpoint:
        if not resume:
            raise ValueError(
                f"{checkpoint_dir(workdir, stage)} holds an unfinished stage-{stage} run; "
                "pass --resume to continue it, or choose a new --workdir")
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        logging.info("Resuming stage %d from %s (epoch %d, step %d).", stage,
                     manager.latest_checkpoint, int(epoch_var.numpy()), int(step_var.numpy()))

    callbacks = keras.callbacks.CallbackList(
        [BetaSchedule(beta, epochs, t.beta_schedule, t.beta_constant),
         PrototypeWarmup(use_dynamic, t.prototype_warmup, config.model.dynamic_prototypes)],
        model=model)
    step_fn = make_train_step(model, optimizer, strategy, stage, global_batch, beta,
                              use_dynamic, t.jit_compile)
    writer = tf.summary.create_file_writer(tensorboard_dir(workdir, stage))

    preempted = {"flag": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True)) \
        if _is_main_thread() else None
    try:
        start_epoch = int(epoch_var.numpy())
        for epoch in range(start_epoch, epochs):
            callbacks.on_epoch_begin(epoch)
            skip = int(step_var.numpy()) if epoch == start_epoch else 0
            data = epoch_dataset(config, data_dir, stage, fold, epoch).skip(skip)
            dist = strategy.experimental_distribute_dataset(data)
            bar = keras.utils.Progbar(steps, stateful_metrics=["beta"],
                                      unit_name="step")
            logging.info("Stage %d epoch %d/%d (beta %.3f, dynamic prototypes %s)", stage,
                         epoch + 1, epochs, float(beta.numpy()), bool(use_dynamic.numpy()))
            timer = _EpochTimer()
            for i, batch in enumerate(dist, start=skip):
                logs = {k: float(v) for k, v in step_fn(batch).items()}
                timer.step_done()
                if not np.isfinite(logs["loss"]):
                    raise FloatingPointError(
                        f"stage {stage}: non-finite loss {logs['loss']} at epoch {epoch + 1} step "
                        f"{i + 1}; the last good checkpoint stays latest: {manager.latest_checkpoint}")
                step_var.assign(i + 1)
                global_step = epoch * steps + i
                if global_step % t.log_every == 0:
                    _log_scalars(writer, logs, global_step, beta, optimizer)
                bar.update(i + 1, values=[*logs.items(), ("beta", float(beta.numpy()))])
                if preempted["flag"]:
                    manager.save(checkpoint_number=global_step + 1)
                    raise Preempted(f"SIGTERM: stage {stage} checkpointed at epoch {epoch + 1} "
                                     f"step {i + 1}; continue with --resume")
            timer.lap("training")
            epoch_var.assign(epoch + 1)
            step_var.assign(0)
            if epoch + 1 == epochs and t.ema_momentum:
                # The stage ends with the weights' moving average (train.ema_momentum);
                # the last checkpoint holds them, so later stages and evaluation use them.
                optimizer.finalize_variable_values(model.trainable_variables)
            manager.save(checkpoint_number=(epoch + 1) * steps)
            timer.lap("checkpoint")
            if t.validate_every and ((epoch + 1) % t.validate_every == 0 or epoch + 1 == epochs):
                val = evaluate_stage(model, config, data_dir, stage, fold,
                                     max_queries=config.eval.val_queries, progress=False,
                                     num_examples=config.eval.num_logged_examples)
                _log_validation(writer, val, stage, epoch + 1)
                logging.info("Stage %d epoch %d/%d validation: %s", stage, epoch + 1, epochs,
                             validation_line(val))
                timer.lap("validation")
            logging.info("Stage %d epoch %d/%d took %s", stage, epoch + 1, epochs, timer)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        writer.flush()

    summary = evaluate_stage(model, config, data_dir, stage, fold,
                             max_queries=config.eval.max_queries, progress=True)
    write_json_atomic(os.path.join(stage_dir(workdir, stage), RESULT_FILE),
                      {"stage": stage, "fold": fold, "summary": summary,
                       "checkpoint": manager.latest_checkpoint})
    return summary


class _EpochTimer:
    """Wall time of an epoch's parts, for the log: the first step (data start-up and
    tracing) apart from the rest, then each `lap` since the previous one."""

    def __init__(self):
        self._last = time.perf_counter()
        self._parts = []
        self._first = None

    def step_done(self):
        if self._first is None:
            self._first = time.perf_counter() - self._last

    def lap(self, name: str):
        now = time.perf_counter()
        self._parts.append((name, now - self._last))
        self._last = now

    def __str__(self):
        text = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self._parts)
        if self._first is not None:
            text += f" (first step {self._first:.1f} s)"
        return text


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def evaluate_stage(model, config, data_dir, stage, fold, max_queries=None, progress=True,
                   num_examples=0) -> dict:
    """Stage 1: foreground IoU; stages 2/3: the k-way §8 summary."""
    if stage == 1:
        return eval_lib.evaluate_foreground(model, data_dir=data_dir, eval_size=config.data.eval_size,
                                            max_queries=max_queries, progress=progress)
    return eval_lib.evaluate_kway(model, data_dir=data_dir, stage=stage, fold=fold,
                                  fold_set=config.data.fold_set, eval_size=config.data.eval_size,
                                  head=config.eval.head, max_queries=max_queries,
                                  foreground_gate=bool(config.eval.get("foreground_gate", False)),
                                  progress=progress, return_examples=num_examples)


def _log_scalars(writer, logs, step, beta, optimizer):
    with writer.as_default(step=step):
        for key, value in logs.items():
            tf.summary.scalar(f"train/{key}", value)
        tf.summary.scalar("train/beta", beta)
        tf.summary.scalar("train/learning_rate", _learning_rate_used(optimizer))


def _learning_rate_used(optimizer):
    """The rate of the step just taken: the optimizer's counter has already moved on,
    so its `learning_rate` would be the next step's."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    schedule = inner._learning_rate
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return schedule(inner.iterations - 1)
    return inner.learning_rate


def validation_line(summary) -> str:
    """One console line of a validation summary, so progress is visible without
    TensorBoard: "base MIoU 0.323, novel MIoU 0.041, human MIoU 0.278, overall acc 0.637
    (50 pairs)" for a one-shot stage, "foreground IoU 0.849, overall acc 0.982 (5
    images)" for stage 1 (the default run's stage 3 epoch 2 and stage 1 epoch 14)."""
    names = (("foreground_iou", "foreground IoU"), ("base_miou", "base MIoU"),
             ("novel_miou", "novel MIoU"), ("human_miou", "human MIoU"),
             ("overall_acc", "overall acc"))
    parts = [f"{label} {summary[key]:.3f}" for key, label in names
             if summary.get(key) is not None and np.isfinite(summary[key])]
    count = (f" ({summary['num_pairs']} pairs)" if "num_pairs" in summary else
             f" ({summary['num_images']} images)" if "num_images" in summary else "")
    return ", ".join(parts) + count


def _log_validation(writer, summary, stage, epoch):
    with writer.as_default(step=epoch):
        for key in ("novel_miou", "base_miou", "human_miou", "overall_acc", "foreground_iou"):
            if key in summary and summary[key] is not None and np.isfinite(summary[key]):
                tf.summary.scalar(f"val/{key}", summary[key])
        examples = summary.pop("examples", None)
        if examples:
            from popnet_tf.data import show  # colours live with the data viewer
            rows = [show.episode_panel(e, stage) for e in examples]
            tf.summary.image("val/episodes", np.stack(rows), max_outputs=len(rows))
    writer.flush()


def train(config, workdir: str, stage: int, fold: int, resume: bool = False) -> dict:
    """Trains `stage` and every stage it needs that the workdir lacks, in order
    (SPEC §7: 1 → 2 → 3), and returns the last stage's evaluation summary."""
    if stage not in (1, 2, 3):
        raise ValueError(f"--stage must be 1, 2 or 3, got {stage!r}")
    check_config(config)
    # Before any TensorFlow op (a multi-worker strategy cannot be made after one); the
    # stages reuse it. Other strategies are made by each stage, when needed.
    if strategy_name(config.train.strategy) == "multiworker":
        get_strategy(config.train.strategy)
    # A multi-worker cluster's other workers write into folders of their own.
    workdir = worker_workdir(workdir)
    if not all(stage_finished(workdir, s) for s in popnet.stages_needed(config, stage)):
        check_backbone_weights(config)  # a bad weight file: one line, before the workdir is made
    classes.novel_ids(3, fold, config.data.fold_set)  # validates fold and fold set
    check_dataset_present(config)     # no dataset: fail before the workdir is made
    integrity.check_workdir(workdir)  # read-only or full: fail before writing anything
    # One training per workdir: a second one (a retried job, a second terminal) would
    # write the same checkpoints; it refuses here, before reading or writing anything.
    with integrity.lock_workdir(workdir):
        return _train_locked(config, workdir, stage, fold, resume)


def _train_locked(config, workdir: str, stage: int, fold: int, resume: bool) -> dict:
    """`train` once its pre-flight checks pass and it holds the workdir's lock."""
    check_run_record(config, workdir, fold)
    verify_checkpoints(config, workdir, stage, resume)
    _configure_runtime(config)
    data_dir = ensure_dataset(config)
    manifest = integrity.verify_dataset(data_dir)  # damaged shards: fail before any model is built
    check_dataset_record(workdir, data_dir, manifest)  # the dataset the workdir was trained on
    for s in popnet.stages_needed(config, stage):
        if s > 1 and not stage_finished(workdir, s):  # one-shot stages need supports
            try:
                episodes.check_supports(data_dir, stage=s, fold=fold, fold_set=config.data.fold_set)
            except ValueError as e:  # before stage 1 spends its time, not when stage 2 starts
                raise integrity.DatasetContentError(
                    f"{e}. Rebuild it with more labelled training images") from None
    previous, summary = None, None
    for s in popnet.stages_needed(config, stage):
        if stage_finished(workdir, s):
            if s != stage:
                logging.info("Stage %d found finished in %s: restoring it.", s, workdir)
                previous = restore_stage(config, workdir, s)
                continue
            logging.info("Stage %d is already trained in %s: evaluating it.", s, workdir)
            model = restore_stage(config, workdir, s)
            return evaluate_stage(model, config, data_dir, s, fold, config.eval.max_queries)
        if s != stage:
            logging.info("Stage %d is missing in %s: training it first.", s, workdir)
        start = time.time()
        summary = train_stage(config, workdir, s, fold, data_dir, resume=resume, previous=previous)
        logging.info("Stage %d done in %.0f s: %s", s, time.time() - start, _short(summary))
        if s != stage:
            previous = restore_stage(config, workdir, s)
    return summary


def verify_checkpoints(config, workdir: str, stage: int, resume: bool) -> None:
    """Pre-flight for the checkpoints a run will read: an unfinished stage is only
    continued with --resume, and each latest checkpoint reads back in full
    (integrity.verify_checkpoint), before any model is built."""
    for s in popnet.stages_needed(config, stage):
        state = tf.train.get_checkpoint_state(checkpoint_dir(workdir, s))
        if state is None or not state.model_checkpoint_path:
            continue
        if not stage_finished(workdir, s) and not resume:
            raise integrity.RunConfigError(
                f"{checkpoint_dir(workdir, s)} holds an unfinished stage-{s} run; pass --resume "
                "to continue it, or choose a new --workdir")
        integrity.verify_checkpoint(state.model_checkpoint_path)


def _short(summary: dict) -> str:
    keys = ("foreground_iou", "novel_miou", "base_miou", "human_miou", "overall_acc")
    return ", ".join(f"{k} {summary[k]:.3f}" for k in keys if k in summary)


def native_bfloat16() -> bool:
    """Whether this machine computes bfloat16 natively: a GPU of compute capability
    >= 8.0 (Ampere on), or, without a GPU, a CPU with AVX512-BF16 or AMX-BF16 (oneDNN
    then runs bfloat16 convolutions ~1.6x faster than float32; elsewhere they are
    emulated and slower)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = [tf.config.experimental.get_device_details(g) for g in gpus]
        return all(d.get("compute_capability", (0, 0)) >= (8, 0) for d in details)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no way to tell, assume not
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_policy(name: str) -> str:
    """The Keras dtype policy of `train.mixed_precision`: "auto" is "mixed_bfloat16"
    where the hardware computes bfloat16 natively (`native_bfloat16`), else "float32"."""
    if name == "auto":
        return "mixed_bfloat16" if native_bfloat16() else "float32"
    return name


def _configure_runtime(config) -> None:
    """Precision policy and determinism, set once before any model is built."""
    policy = precision_policy(config.train.mixed_precision)
    if config.train.mixed_precision == "auto":
        logging.info("train.mixed_precision=auto: %s on this machine.", policy)
    keras.mixed_precision.set_global_policy(policy)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def format_summary(summary: dict, stage: int, fold: int, method: str = "popnet") -> str:
    """The console table of a stage's final evaluation, titled by the method trained
    (POPNet or a baseline of configs/baselines/)."""
    title = f"{baselines.METHOD_TITLES.get(method, method)} stage {stage} fold {fold}"
    if stage == 1:
        return (f"| {title} | foreground IoU | MIoU | overall acc |\n|---|---|---|---|\n"
                f"| | {100 * summary['foreground_iou']:.1f} | {100 * summary['miou']:.1f} | "
                f"{100 * summary['overall_acc']:.1f} |\n")
    return metrics.format_table(summary, f"{title} ({summary.get('num_pairs', '?')} pairs, "
                                         f"{summary.get('head', '')} head)")
