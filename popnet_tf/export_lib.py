"""Export a trained workdir as a versioned SavedModel for TF Serving.

The exported model is the workdir's last trained one-shot stage (stage 3 with
its frozen stages 2 and 1 inside through KIM), restored from its checkpoint
with the prototype store, wrapped in `serving.OneShotParser` and written with
`keras.export.ExportArchive`: one endpoint per signature of `serving.SIGNATURES`,
`serving_default` being the encoded-bytes one that TF Serving's REST API uses
by default.

Layout (what TF Serving's `--model_base_path` expects):
    DIR/<version>/saved_model.pb, variables/       the SavedModel
    DIR/<version>/assets.extra/popnet_export.json  what was exported and how
                                                   (TF Serving ignores it)
The version is 1 + the largest integer subfolder of DIR, or the one asked for.
The SavedModel is written into a hidden folder of DIR and renamed into place,
so TF Serving (which polls DIR) never sees half a version, and a crash leaves
none behind.

Example:
    >>> path = export_saved_model("workdirs/synthetic_cpu_fold1", "exported/popnet")
    >>> path   # 'exported/popnet/1'
"""

from __future__ import annotations

import datetime
import json
import os
import shutil

import keras
import ml_collections
import tensorflow as tf
from absl import logging

from popnet_tf import classes, serving, train_lib

FORMAT_VERSION = 1


def load_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """The config (and the whole record) a workdir was trained with, from W/run.json.

    Example:
        >>> config, record = load_run_config("workdirs/synthetic_cpu_fold1")
        >>> config.data.eval_size, record["fold"]
    """
    path = os.path.join(workdir, train_lib.RUN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: not found; --workdir must be a folder written by popnet_tf.train")
    with open(path) as f:
        record = json.load(f)
    if "config" not in record:
        raise ValueError(f"{path}: no 'config' entry; the workdir is from an older version, retrain it")
    return ml_collections.ConfigDict(record["config"]), record


def last_trained_stage(workdir: str) -> int:
    """The highest one-shot stage (3, else 2) with a checkpoint in the workdir.

    Example:
        >>> last_trained_stage("workdirs/synthetic_cpu_fold1")   # 3
    """
    for stage in (3, 2):
        directory = train_lib.checkpoint_dir(workdir, stage)
        if tf.train.latest_checkpoint(directory):
            return stage
        state = tf.train.get_checkpoint_state(directory)
        if state is not None and state.model_checkpoint_path:
            # Stage <stage> was trained but its latest checkpoint is gone: never fall back
            # to an earlier stage without saying so.
            raise ValueError(f"{directory}: the latest stage {stage} checkpoint "
                             f"{state.model_checkpoint_path} has missing or incomplete files "
                             "(.index, .data); restore them (or export another stage "
                             "with --stage)")
    raise FileNotFoundError(
        f"{workdir}: no checkpoint of stage 3 or 2 (stage 1 is not one-shot and is not "
        f"exported); train one first: python -m popnet_tf.train --workdir={workdir} --stage=3")


def restore_model(workdir: str, stage: int | None = None):
    """(model, config, stage, record): the stage restored from its latest checkpoint,
    its earlier stages and its prototype store included.

    Example:
        >>> model, config, stage, _ = restore_model("workdirs/synthetic_cpu_fold1")
    """
    config, record = load_run_config(workdir)
    stage = stage or last_trained_stage(workdir)
    if stage not in (2, 3):
        raise ValueError(f"stage must be 2 or 3 (the one-shot stages), got {stage!r}")
    if not train_lib.stage_finished(workdir, stage):
        logging.warning("%s: stage %d has checkpoints but no %s: exporting an unfinished stage.",
                        workdir, stage, train_lib.RESULT_FILE)
    keras.mixed_precision.set_global_policy(train_lib.precision_policy(config.train.mixed_precision))
    # One read of the latest checkpoint: a training still saving in this workdir may
    # write a newer one meanwhile, and the record must name the one restored.
    checkpoint = tf.train.latest_checkpoint(train_lib.checkpoint_dir(workdir, stage))
    model = train_lib.restore_stage(config, workdir, stage, checkpoint=checkpoint)
    record = {**record, "restored_checkpoint": checkpoint}
    return model, config, stage, record


def next_version(out_dir: str) -> int:
    """1 + the largest integer-named subfolder of out_dir (1 when none).

    Example:
        >>> next_version("exported/popnet")   # 3 when 1/ and 2/ exist
    """
    if not os.path.isdir(out_dir):
        return 1
    versions = [int(n) for n in os.listdir(out_dir)
                if n.isdigit() and os.path.isdir(os.path.join(out_dir, n))]
    return max(versions, default=0) + 1


def build_archive(parser: serving.OneShotParser) -> keras.export.ExportArchive:
    """An ExportArchive holding the parser's model and one endpoint per signature.

    Example:
        >>> build_archive(serving.OneShotParser(model, 608)).write_out("/tmp/popnet/1")
    """
    archive = keras.export.ExportArchive()
    archive.track(parser.model)
    for name in serving.SIGNATURES:
        fn = parser.parse_encoded if name == serving.SIGNATURE_ENCODED else parser.parse_images
        archive.add_endpoint(name, fn, input_signature=serving.input_signature(name))
    return archive


def export_saved_model(workdir: str, out_dir: str, *, version: int | None = None,
                       stage: int | None = None, mask_values: str = "user",
                       head: str | None = None, foreground_gate: bool | None = None) -> str:
    """Exports the workdir's model to out_dir/<version>/ and returns that path.

    Args:
        workdir: a training workdir (W/run.json, W/stage<N>/checkpoints).
        out_dir: the model's base folder (TF Serving's --model_base_path).
        version: the version folder; default 1 + the largest existing one.
        stage: 2 or 3; default the last trained one.
        mask_values: "user" (a support mask's values 1-254 are the classes, static
            prototypes) or "merged" (values are ATR-OS merged ids, base classes use
            the dynamic store); see `serving`.
        head: "ncm", "agm" or "mean"; default the config's eval.head.
        foreground_gate: gate the head by stage 1's human probability; default the
            config's eval.foreground_gate (off).
    """
    if mask_values not in serving.MASK_VALUES:
        raise ValueError(f"mask_values must be one of {serving.MASK_VALUES}, got {mask_values!r}")
    _version_dir(out_dir, version)  # refuse a taken version before the slow restore
    model, config, stage, record = restore_model(workdir, stage)
    if foreground_gate is None:
        foreground_gate = bool(config.eval.get("foreground_gate", False))
    parser = serving.OneShotParser(model, eval_size=config.data.eval_size,
                                   mask_values=mask_values, head=head or config.eval.head,
                                   foreground_gate=foreground_gate)
    info = {"stage": stage, "fold": record.get("fold"), "fold_set": config.data.fold_set,
            "workdir": os.path.abspath(workdir),
            "checkpoint": record["restored_checkpoint"]}
    path = write_version(parser, out_dir, version=version, info=info)
    logging.info("Exported stage %d of %s to %s (mask values: %s, head: %s, foreground "
                 "gate: %s).", stage, workdir, path, parser.mask_values, parser.head,
                 parser.foreground_gate)
    return path


def _check_out_dir(out_dir: str):
    """Refuses (one line) an out_dir that cannot become a folder: it or an ancestor is a
    file, or its nearest existing ancestor is not writable; checked before the slow restore."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{out_dir}: cannot export there: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{out_dir}: cannot export there: {path} is not writable")


def _version_dir(out_dir: str, version: int | None) -> tuple[int, str]:
    _check_out_dir(out_dir)
    if version is None:
        version = next_version(out_dir)
        while os.path.exists(os.path.join(out_dir, str(version))):  # a file of that name
            version += 1
    version = int(version)
    if version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    final = os.path.join(out_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"{final}: version {version} exists; choose another --version "
                              "or omit it to take the next free one")
    return version, final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the existence check
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Deletes `.tmp-<version>-<pid>` folders of exports whose process is gone (killed
    mid-write: SIGKILL skips `write_version`'s cleanup). A running export's folder is
    left alone. Returns the removed paths.

    Example:
        >>> remove_stale_temporaries("exported/popnet")
        ['exported/popnet/.tmp-3-41235']
    """
    removed = []
    for name in sorted(os.listdir(out_dir)):
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != ".tmp" or not parts[2].isdigit():
            continue
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not _alive(int(parts[2])):
            shutil.rmtree(path, ignore_errors=True)
            logging.info("Removed %s, left by an export that was killed.", path)
            removed.append(path)
    return removed


def write_version(parser: serving.OneShotParser, out_dir: str, *, version: int | None = None,
                  info: dict | None = None) -> str:
    """Writes the parser's SavedModel (and its metadata, plus `info`) as out_dir/<version>/.

    Written into a hidden folder of out_dir and renamed into place: TF Serving only
    loads integer-named folders, and a failed write leaves nothing behind.

    Example:
        >>> write_version(serving.OneShotParser(model, 608), "exported/popnet")
    """
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temporaries(out_dir)
    version, final = _version_dir(out_dir, version)
    stage = {n: s for s, n in classes.STAGE_NUM_CLASSES.items()}.get(parser.num_classes)
    metadata = {
        "format_version": FORMAT_VERSION,
        "num_classes": parser.num_classes, "eval_size": parser.eval_size,
        "mask_values": parser.mask_values, "head": parser.head,
        "foreground_gate": parser.foreground_gate,
        # The dtype policy traced into the graph: "auto" training is mixed_bfloat16 where the
        # exporting machine computes bfloat16 natively, and the SavedModel keeps it everywhere.
        "precision": parser.model.dtype_policy.name,
        # Merged ids name the stage's classes; a user's values have only the names they give.
        "class_names": (list(classes.STAGE_CLASS_NAMES[stage])
                        if parser.mask_values == "merged" and stage else None),
        "signatures": {name: {"inputs": {s.name: [s.dtype.name, s.shape.as_list()]
                                         for s in serving.input_signature(name)},
                              "outputs": list(serving.OUTPUT_NAMES)}
                       for name in serving.SIGNATURES},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(info or {}),
    }
    tmp = os.path.join(out_dir, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_archive(parser).write_out(tmp, verbose=False)
        train_lib.write_json_atomic(os.path.join(tmp, serving.METADATA_PATH), metadata)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
