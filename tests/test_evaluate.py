"""popnet_tf.evaluate and eval_lib.evaluate: the CLI on a smoke-trained workdir, the k-way / one-way paths
against confusion matrices computed independently, and the Fine-tune path."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import synthetic_cpu
from configs.baselines import finetune as finetune_config
from popnet_tf import classes, eval_lib, evaluate, metrics, train_lib
from popnet_tf.data import episodes
from popnet_tf.models import popnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}


def _smoke_config(data_dir):
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = str(data_dir)
    config.model.kim = False          # one stage: the fixture trains in seconds
    config.train.epochs = 1
    config.train.steps_per_epoch = 2
    config.train.validate_every = 0
    config.eval.max_queries = 1
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke-trained fold-1 workdir and its dataset."""
    root = tmp_path_factory.mktemp("evaluate")
    config = _smoke_config(root / "data")
    workdir = str(root / "work")
    train_lib.train(config, workdir, stage=3, fold=1)
    return config, workdir


def test_cli_kway_writes_results_table_gallery(trained):
    config, workdir = trained
    run = subprocess.run(
        [sys.executable, "-m", "popnet_tf.evaluate", f"--workdir={workdir}", "--fold=1",
         "--way=kway", "--max_queries=3", "--num_examples=2"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out_dir = os.path.join(workdir, "eval", "fold1_kway")
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    for key in ("human_miou", "novel_miou", "base_miou", "overall_acc", "per_class_iou",
                "head", "num_pairs", "config", "checkpoint", "confusion_matrix"):
        assert key in results, key
    assert results["num_pairs"] == 3 * 10          # queries x the ten fixed supports
    assert results["head"] == "ncm" and results["method"] == "popnet"
    assert results["stage_finished"] is True
    assert set(results["per_class_iou"]) == set(classes.MERGED_NAMES)
    assert 0.0 <= results["human_miou"] <= 1.0
    assert results["checkpoint"].startswith(os.path.join(workdir, "stage3", "checkpoints"))
    # The summary is the §8 metrics of the written confusion matrix (recomputed by hand).
    m = np.array(results["confusion_matrix"], np.float64)
    tp = np.diag(m)
    with np.errstate(invalid="ignore"):
        iou = tp / (m.sum(0) + m.sum(1) - tp)
    assert math.isclose(results["human_miou"], np.nanmean(iou), rel_tol=1e-9)
    assert math.isclose(results["novel_miou"], np.nanmean(iou[[5, 7, 9]]), rel_tol=1e-9)
    assert math.isclose(results["overall_acc"], tp.sum() / m.sum(), rel_tol=1e-9)
    table = open(os.path.join(out_dir, "table.md")).read()
    assert f"{100 * results['human_miou']:.1f}" in table and "30 pairs" in table
    assert f"{100 * results['human_miou']:.1f}" in run.stdout
    # Where each class's IoU goes: the six parts of a class with pixels add up to 1,
    # and its IoU part is its §8 IoU; the table says so too.
    for name, parts in results["error_breakdown"].items():
        if parts is not None:
            assert math.isclose(sum(parts.values()), 1.0, rel_tol=1e-9), name
            assert math.isclose(parts["iou"], results["per_class_iou"][name], rel_tol=1e-9)
    absent = np.array(results["absent_class_confusion_matrix"])
    assert absent[0].sum() == 0 and absent.sum() <= m[0].sum()  # relabelled background truth
    assert "Where each class's IoU goes" in table and "class absent from support" in run.stdout
    gallery = Image.open(os.path.join(out_dir, "gallery.png"))
    size = config.data.eval_size
    assert gallery.width == 4 * size and gallery.height > 2 * size  # 4 tiles, 2 rows + legend
    events = os.listdir(os.path.join(workdir, "tensorboard", "eval_fold1_kway"))
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_oneway_results(trained):
    _, workdir = trained
    results = eval_lib.evaluate(workdir, way="oneway", pairs_per_class=1, num_examples=3,
                                progress=False)
    out_dir = os.path.join(workdir, "eval", "fold1_oneway")
    saved = json.load(open(os.path.join(out_dir, "results.json")))
    assert saved["bi_iou"] == results["bi_iou"] and 0.0 <= saved["bi_iou"] <= 1.0
    # One pair per foreground class with images in both q_test and s_test.
    named = [c for c, v in saved["per_class_iou"].items() if v is not None and c != "background"]
    assert saved["num_pairs"] == len(named) and 1 <= saved["num_pairs"] <= 11
    assert saved["pairs_per_class"] == 1 and saved["way"] == "oneway"
    assert os.path.exists(os.path.join(out_dir, "gallery.png"))


def test_wrong_fold_refused(trained):
    _, workdir = trained
    with pytest.raises(ValueError, match="trained on fold 1"):
        eval_lib.evaluate(workdir, way="kway", fold=2, write=False)


def test_dataset_rebuilt_since_training_refused(trained, tmp_path):
    """A dataset rebuilt in the folder the workdir was trained on (another seed or other
    numbers: its q_test may hold training images) was scored silently."""
    _, workdir = trained
    with open(os.path.join(workdir, train_lib.RUN_FILE)) as f:
        record = json.load(f)
    record["dataset"]["fingerprint"] = "0" * 16  # what training recorded, before a rebuild
    other = tmp_path / "work"
    other.mkdir()
    (other / train_lib.RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="which was rebuilt since"):
        eval_lib.evaluate(str(other), way="kway", write=False)


def test_missing_workdir_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json"):
        eval_lib.evaluate(str(tmp_path), way="kway")


class _Background:
    """A stand-in stage that predicts background everywhere: the confusion matrix
    then follows from the ground truth alone."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.store = lambda p, presence, training=False, use_dynamic=True: p

    def infused_features(self, image, training=False):
        return image[:, ::4, ::4, :1]

    def support_prototypes(self, image, mask, training=False):
        hits = tf.cast(tf.equal(tf.cast(mask, tf.int32)[..., None], tf.range(self.num_classes)), tf.float32)
        presence = tf.reduce_max(hits, axis=[1, 2]) * tf.cast(tf.range(self.num_classes) > 0, tf.float32)
        return presence[..., None], presence

    def heads(self, features, prototypes, presence, image, compute_agm=True):
        shape = tf.concat([tf.shape(image)[:3], [self.num_classes]], 0)
        probs = tf.one_hot(tf.zeros(shape[:3], tf.int32), self.num_classes) + 0 * tf.zeros(shape)
        return {"probs": probs}


def test_kway_background_model_by_hand(trained):
    """Every pixel predicted background: IoU_bg = #bg / #labelled, IoU_c = 0 for the
    classes in the (support-relabelled) truth, NaN (left out) for classes absent from
    both truth and prediction."""
    config, _ = trained
    data_dir = config.data.dir
    summary = eval_lib.evaluate_kway(_Background(12), data_dir=data_dir, stage=3, fold=1,
                                     eval_size=config.data.eval_size, head="model",
                                     max_queries=3, progress=False)
    supports = episodes.test_supports(data_dir, stage=3, eval_size=config.data.eval_size)
    support_classes = [set(np.unique(m.numpy()).tolist()) - {255} for m in supports["mask"]]
    counts = np.zeros(12, np.int64)            # truth pixels per class over all pairs
    absent = np.zeros(12, np.int64)            # pixels of classes a support lacked, by class
    for query in episodes.test_queries(data_dir, stage=3, eval_size=config.data.eval_size).take(3):
        label = query["label"].numpy()
        for present in support_classes:
            held = np.isin(label, list(present | {0, 255}))
            kept = np.where(held, label, 0)
            counts += np.bincount(kept[kept != 255].ravel(), minlength=12)
            absent += np.bincount(label[~held].ravel(), minlength=12)
    expected = np.full(12, np.nan)
    expected[0] = counts[0] / counts.sum()
    expected[1:][counts[1:] > 0] = 0.0
    got = np.array([np.nan if v is None else v for v in summary["per_class_iou"].values()])
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert math.isclose(summary["human_miou"], np.nanmean(expected), rel_tol=1e-9)
    assert math.isclose(summary["overall_acc"], counts[0] / counts.sum(), rel_tol=1e-9)
    assert summary["num_pairs"] == 30
    # Every pixel of a class a support lacked is in column 0 (predicted background) of
    # the absent-class matrix, in the row of its own class; so each foreground class
    # of the truth loses all of its union to "missed as background".
    assert absent[1:].sum() > 0                # the test supports do not hold every class
    got_absent = np.array(summary["absent_class_confusion_matrix"])
    np.testing.assert_array_equal(got_absent[:, 0], absent)
    assert got_absent[:, 1:].sum() == 0
    for c, parts in enumerate(summary["error_breakdown"].values(), start=1):
        assert (parts is None) == (counts[c] == 0)
        if parts is not None:
            assert parts["missed_as_background"] == 1.0 and parts["iou"] == 0.0


@pytest.mark.parametrize("way, max_queries", [("oneway", None), ("kway", None), ("kway", 3)])
def test_progress_bar_total_is_known(trained, monkeypatch, way, max_queries):
    """The bars show N/total, not N/Unknown: one-way counts pairs, k-way queries (q_test's
    manifest count, or --max_queries)."""
    config, _ = trained
    targets = []
    monkeypatch.setattr(eval_lib, "Progbar",
                        lambda target, **kw: targets.append(target) or _SilentBar())
    kwargs = dict(seed=config.seed, pairs_per_class=2) if way == "oneway" else dict(max_queries=max_queries)
    run = eval_lib.evaluate_oneway if way == "oneway" else eval_lib.evaluate_kway
    summary = run(_Background(12), head="model", progress=True, data_dir=config.data.dir,
                  stage=3, fold=1, eval_size=config.data.eval_size, **kwargs)
    queries = episodes.test_queries(config.data.dir, stage=3, eval_size=config.data.eval_size)
    num_queries = sum(1 for _ in queries)
    assert num_queries == config.data.num_test_query == int(queries.cardinality())
    if way == "oneway":
        assert targets == [summary["num_pairs"]] and summary["num_pairs"] > 0
    else:
        assert targets == [max_queries or num_queries]
        assert summary["num_pairs"] == targets[0] * len(summary["test_supports"])


class _SilentBar:
    def update(self, *args, **kwargs):
        pass


def test_oneway_background_model_by_hand(trained):
    """Background everywhere in one-way: per class, fg IoU 0 and bg IoU = #bg / #all over
    its pairs; the background entry averages those over classes (SPEC §8); Bi-IoU is
    the mean of fg and bg IoU of the summed matrix."""
    config, _ = trained
    kwargs = dict(data_dir=config.data.dir, stage=3, fold=1, eval_size=config.data.eval_size)
    summary = eval_lib.evaluate_oneway(_Background(12), head="model", pairs_per_class=2,
                                       seed=config.seed, progress=False, **kwargs)
    pairs = episodes.test_episodes(way="oneway", pairs_per_class=2, seed=config.seed, **kwargs)
    fg, bg = np.zeros(12), np.zeros(12)
    for pair in pairs:
        label, c = pair["query_label"].numpy(), int(pair["class_id"])
        fg[c] += np.sum(label == c)
        bg[c] += np.sum((label != c) & (label != 255))
    used = fg > 0
    bg_iou = bg[used] / (bg[used] + fg[used])
    assert math.isclose(summary["per_class_iou"]["background"], bg_iou.mean(), rel_tol=1e-9)
    assert all(summary["per_class_iou"][classes.MERGED_NAMES[c]] == 0.0 for c in np.flatnonzero(used))
    assert math.isclose(summary["human_miou"], np.mean([bg_iou.mean(), *[0.0] * used.sum()]),
                        rel_tol=1e-9)
    assert math.isclose(summary["bi_iou"], (bg.sum() / (bg.sum() + fg.sum()) + 0.0) / 2, rel_tol=1e-9)


def test_class_predicted_but_absent_from_truth_counts_zero():
    """A class the model predicts that the ground truth never holds has IoU 0 and
    lowers the means; one neither predicted nor present is left out."""
    m = np.array([[6, 0, 2, 0],     # 2 background pixels predicted as class 2
                  [1, 3, 0, 0],
                  [0, 0, 0, 0],     # class 2: absent from the truth
                  [0, 0, 0, 0]])    # class 3: absent everywhere
    s = metrics.kway_summary(m, novel=(2, 3), class_names=["bg", "a", "b", "c"])
    iou = [6 / (6 + 1 + 2), 3 / (3 + 0 + 1), 0.0]
    assert s["per_class_iou"]["b"] == 0.0 and s["per_class_iou"]["c"] is None
    assert math.isclose(s["human_miou"], sum(iou) / 3)
    assert math.isclose(s["novel_miou"], 0.0)
    assert math.isclose(s["base_miou"], iou[1])


def test_finetune_kway_tunes_per_support_and_restores(trained):
    config, _ = trained
    ft = finetune_config.get_config("smoke")
    ft.data.dir = config.data.dir
    model = popnet.build_stage(ft, 3)
    popnet.build_variables(model, 3, ft.data.crop_size)
    before = [v.numpy().copy() for v in model.weights]
    kwargs = dict(data_dir=ft.data.dir, stage=3, fold=1, eval_size=ft.data.eval_size,
                  max_queries=1, progress=False)
    untuned = eval_lib.finetune_kway(model, steps=0, learning_rate=0.5, **kwargs)
    tuned = eval_lib.finetune_kway(model, steps=3, learning_rate=0.5, return_examples=2, **kwargs)
    assert untuned["num_pairs"] == tuned["num_pairs"] == 1 * 10
    assert len(tuned["examples"]) == 2
    # Tuning changes the predictions; every weight is back afterwards.
    assert untuned["confusion_matrix"] != tuned["confusion_matrix"]
    # Scored through eval_lib like the stages: its error breakdown adds up and agrees
    # with its IoUs, and the absent-class matrix holds relabelled foreground truth only.
    for name, parts in tuned["error_breakdown"].items():
        if parts is not None:
            assert math.isclose(sum(parts.values()), 1.0, rel_tol=1e-9), name
            assert math.isclose(parts["iou"], tuned["per_class_iou"][name], rel_tol=1e-9)
    absent = np.array(tuned["absent_class_confusion_matrix"])
    assert absent.shape == (12, 12) and absent[0].sum() == 0 and absent.sum() > 0
    # Those pixels are truth background in the §5 matrix: per predicted class, no more
    # absent-class pixels than truth-background ones.
    assert (absent.sum(0) <= np.array(tuned["confusion_matrix"])[0]).all()
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


@pytest.mark.parametrize("way", ["kway", "oneway"])
def test_foreground_gate_follows_stage_one(trained, way):
    """With stage 1 sure that nothing is human, the gated evaluation predicts background
    everywhere; sure that everything is, it equals the ungated one. A workdir without
    stage 1 (KIM off) is refused with a clear message."""
    config, workdir = trained
    config = _smoke_config(config.data.dir)
    config.model.kim = True
    previous = None
    for stage in (1, 2, 3):
        model = popnet.build_stage(config, stage, previous=previous)
        popnet.build_variables(model, stage, config.data.crop_size)
        previous = model
    stage1 = model.previous.previous
    common = dict(data_dir=config.data.dir, stage=3, fold=1, eval_size=config.data.eval_size,
                  progress=False)
    if way == "kway":
        run = lambda gate: eval_lib.evaluate_kway(model, foreground_gate=gate, max_queries=2,
                                                  **common)
    else:
        run = lambda gate: eval_lib.evaluate_oneway(model, foreground_gate=gate,
                                                    pairs_per_class=2, **common)
    plain = run(False)
    bias = stage1.classifier.bias
    bias.assign([0.0, 1e4])                          # human everywhere
    assert run(True)["per_class_iou"] == plain["per_class_iou"]
    bias.assign([1e4, 0.0])                          # human nowhere
    nothing = run(True)
    assert nothing["foreground_gate"] and not plain["foreground_gate"]
    if way == "kway":
        m = np.array(nothing["confusion_matrix"])
        assert m[:, 1:].sum() == 0 and m[:, 0].sum() > 0
    else:
        assert all(v == 0 for c, v in nothing["per_class_iou"].items() if c != "background")
    with pytest.raises(ValueError, match="foreground gate needs stage 1"):
        eval_lib.evaluate(workdir, way=way, foreground_gate=True, max_queries=1,
                          pairs_per_class=1, progress=False, write=False)


def test_gated_and_ungated_results_have_their_own_tensorboard_runs(trained, tmp_path):
    """Gated results go to their own folder and their own TensorBoard run, so the two
    evaluations of one model show side by side instead of one hiding the other."""
    _, workdir = trained
    results = eval_lib.evaluate(workdir, way="kway", max_queries=1, num_examples=0,
                                progress=False, write=False)
    out = str(tmp_path / "work")
    plain = eval_lib.write_outputs(dict(results), [], out)
    gated = eval_lib.write_outputs({**results, "foreground_gate": True}, [], out)
    assert (os.path.basename(plain), os.path.basename(gated)) == (
        "fold1_kway", "fold1_kway_foreground_gate")
    runs = sorted(os.listdir(os.path.join(out, "tensorboard")))
    assert runs == ["eval_fold1_kway", "eval_fold1_kway_foreground_gate"]
    for run in runs:
        assert any(e.startswith("events.out.tfevents")
                   for e in os.listdir(os.path.join(out, "tensorboard", run))), run


def test_cli_way_choices_are_eval_libs():
    """The CLI lists the ways itself (it imports eval_lib, and TensorFlow, only after
    parsing its flags); the two lists must agree."""
    assert evaluate.WAYS == list(eval_lib.WAYS)


# ----------------------------------------------------------------------------- user mistakes
@pytest.mark.parametrize("kwargs, flag", [
    ({"max_queries": -1}, "--max_queries=-1"),          # used to score every query
    ({"way": "oneway", "pairs_per_class": 0}, "--pairs_per_class=0"),  # wrote an empty results.json
    ({"way": "oneway", "pairs_per_class": -2}, "--pairs_per_class=-2"),
    ({"num_examples": -1}, "--num_examples=-1"),
])
def test_bad_counts_refused_naming_the_flag(trained, kwargs, flag):
    _, workdir = trained
    with pytest.raises(ValueError, match=flag):
        eval_lib.evaluate(workdir, progress=False, write=False, **kwargs)


@pytest.mark.parametrize("field, value", [
    ("data.fold_set", "journal"),   # novel classes of another fold set
    ("model.method", "panet"),      # POPNet's checkpoint restored into a baseline
    ("model.kim", True),            # the fixture trained one stage, without KIM
    ("eval.head", "bogus"),         # used to score the mean of both heads as "bogus"
])
def test_config_of_another_training_or_unknown_head_refused(trained, field, value):
    config, workdir = trained
    config = config.copy_and_resolve_references()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ValueError, match=f"{field}=.*'?{value}'? in --config|{field}='{value}'"):
        eval_lib.evaluate(workdir, config=config, progress=False, write=False)


def test_damaged_run_json_named(tmp_path):
    (tmp_path / "run.json").write_text('{"fold": 1, "conf')
    with pytest.raises(ValueError, match="run.json: damaged"):
        eval_lib.evaluate(str(tmp_path), way="kway")


def test_damaged_dataset_refused_and_other_folder_scored_with_a_warning(trained, tmp_path,
                                                                       caplog):
    """A truncated shard used to end in a DataLossError traceback. Another dataset in
    another folder is cross-dataset evaluation: scored, with a warning (the same folder
    rebuilt since training is refused: test_dataset_rebuilt_since_training_refused)."""
    config, workdir = trained
    data = tmp_path / "data"
    shutil.copytree(config.data.dir, data)
    config = config.copy_and_resolve_references()
    config.data.dir = str(data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["test_supports"] = manifest["test_supports"][::-1]  # another dataset's supports
    (data / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        eval_lib.evaluate(workdir, config=config, progress=False, write=False, max_queries=1)
    assert f"evaluating on {data}, not the dataset the workdir was trained on" in caplog.text
    shard = next(data.glob("q_test-*.tfrecord"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        eval_lib.evaluate(workdir, config=config, progress=False, write=False)


def test_unwritable_eval_folder_fails_before_the_evaluation(trained, tmp_path, monkeypatch):
    _, workdir = trained
    work = tmp_path / "work"
    shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("eval", "tensorboard"))
    (work / "eval").write_text("a file where the folder goes")
    monkeypatch.setattr(train_lib, "restore_stage", lambda *a, **k: pytest.fail("evaluated first"))
    with pytest.raises(OSError, match="eval/fold1_kway: cannot write"):
        eval_lib.evaluate(str(work), way="kway", progress=False)


def test_no_examples_leave_no_earlier_gallery(tmp_path):
    results = {"fold": 1, "way": "kway", "stage": 3, "method": "popnet", "num_pairs": 0,
               "head": "ncm", "checkpoint": "c", "human_miou": 0.5}
    out = eval_lib.eval_dir(str(tmp_path), 1, "kway")
    os.makedirs(out)
    with open(os.path.join(out, eval_lib.GALLERY_FILE), "wb") as f:
        f.write(b"an earlier run's gallery")
    eval_lib.write_outputs(results, [], str(tmp_path))
    assert not os.path.exists(os.path.join(out, eval_lib.GALLERY_FILE))


def test_stage2_results_do_not_overwrite_stage3s(tmp_path):
    results = {"fold": 1, "way": "kway", "method": "popnet", "num_pairs": 0, "head": "ncm",
               "checkpoint": "c", "human_miou": 0.5}
    three = eval_lib.write_outputs({**results, "stage": 3}, [], str(tmp_path))
    two = eval_lib.write_outputs({**results, "stage": 2}, [], str(tmp_path))
    assert os.path.basename(three) == "fold1_kway" and os.path.basename(two) == "fold1_kway_stage2"
    assert json.load(open(os.path.join(three, "results.json")))["stage"] == 3


def test_kway_results_name_classes_without_ground_truth(caplog):
    """A class no test pair holds (e.g. a novel class absent from q_test) drops out of the
    MIoUs; the summary and the log say which, instead of a quiet 'n/a' in the table."""
    names = classes.STAGE_CLASS_NAMES[3]
    matrix, absent = metrics.ConfusionMatrix(len(names)), metrics.ConfusionMatrix(len(names))
    labels = np.arange(len(names))
    labels[names.index("hat")] = 0  # hat never true, and never predicted either
    matrix.update(labels, labels)
    supports = {"source_id": tf.constant([b"s0", b"s1"])}
    with caplog.at_level("WARNING"):
        summary = eval_lib._kway_results(matrix, absent, supports, stage=3, fold=2,
                                         fold_set="paper")
    assert summary["classes_without_ground_truth"] == ["hat"]
    assert summary["per_class_iou"]["hat"] is None
    assert "no pair's ground truth holds hat" in caplog.text


def test_results_of_an_unfinished_stage_say_so(trained, monkeypatch):
    """A stage still training is scored from its latest checkpoint; the results used to
    say so only in the log."""
    _, workdir = trained
    monkeypatch.setattr(train_lib, "stage_finished", lambda *a: False)
    results = eval_lib.evaluate(workdir, way="kway", max_queries=1, progress=False, write=False)
    assert results["stage_finished"] is False


def _newer_checkpoint_saved(directory):
    """What a training still running in the workdir does: a newer checkpoint appears
    and the state file names it (here a copy of the latest under a higher number)."""
    latest = tf.train.latest_checkpoint(directory)
    newer = f"{latest}0"
    for path in tf.io.gfile.glob(f"{latest}.*"):
        shutil.copy(path, newer + path[len(latest):])
    tf.compat.v1.train.update_checkpoint_state(directory, newer, all_model_checkpoint_paths=[latest, newer])
    return newer


def test_results_name_the_checkpoint_scored_while_a_training_saves(trained, tmp_path, monkeypatch):
    """evaluate read the latest checkpoint for results.json, then restore_stage read it
    again: a save landing between scored one checkpoint under the other's name."""
    _, workdir = trained
    work = str(tmp_path / "work")
    shutil.copytree(workdir, work)
    directory = train_lib.checkpoint_dir(work, 3)
    restore, restored = train_lib.restore_stage, []

    def restore_while_a_training_saves(*args, **kwargs):
        _newer_checkpoint_saved(directory)
        return restore(*args, **kwargs)

    checkpoint_restore = tf.train.Checkpoint.restore
    monkeypatch.setattr(train_lib, "restore_stage", restore_while_a_training_saves)
    monkeypatch.setattr(tf.train.Checkpoint, "restore",
                        lambda self, path, *a, **k: restored.append(path)
                        or checkpoint_restore(self, path, *a, **k))
    results = eval_lib.evaluate(work, way="kway", max_queries=1, progress=False, write=False)
    assert restored == [results["checkpoint"]]
    assert results["checkpoint"] != tf.train.latest_checkpoint(directory)  # the newer one


def _bilinear_half_pixel(x, out_h, out_w):
    """NumPy reference of tf.image.resize(method="bilinear") (half-pixel centres, no
    antialias) for [h, w, C] arrays."""
    h, w = x.shape[:2]

    def weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = weights(h, out_h)
    c0, c1, fc = weights(w, out_w)
    rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def test_prediction_at_label_resolution_crops_padding_and_is_bilinear():
    # SPEC §8: scores at the label's own resolution. The padded region (beyond
    # valid_size) must not reach the prediction, and the probabilities are resized
    # bilinearly before the argmax (nearest neighbour picks other labels here).
    rng = np.random.default_rng(3)
    probs = rng.random((6, 6, 3)).astype(np.float32)
    probs[:, 4:] = [0.0, 0.0, 10.0]          # padding columns that favour class 2
    valid = np.array([6, 4], np.int32)
    label_shape = (9, 7)
    expected = np.argmax(_bilinear_half_pixel(probs[:6, :4], *label_shape), axis=-1)
    got = eval_lib._to_label_resolution(tf.constant(probs), tf.constant(valid),
                                        tf.constant(label_shape)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_score_pair_keeps_ignore_out_of_the_matrix():
    # SPEC §5 relabelling (absent class -> background) must leave 255 ignored (§6, §8):
    # an ignored pixel counts nowhere. By hand: support holds class 1 only.
    label = tf.constant([[0, 1, 2], [255, 255, 1]], tf.int32)
    probs = np.zeros((2, 3, 3), np.float32)
    probs[..., 1] = 1.0                                            # predicts 1 everywhere
    presence = tf.constant([0.0, 1.0, 0.0])
    pred, truth, cm, absent = eval_lib._score_pair(tf.constant(probs), tf.constant([2, 3]),
                                                   label, presence)
    np.testing.assert_array_equal(truth.numpy(), [[0, 1, 0], [255, 255, 1]])
    np.testing.assert_array_equal(cm.numpy(), [[0, 2, 0], [0, 2, 0], [0, 0, 0]])
    np.testing.assert_array_equal(absent.numpy(), [[0, 0, 0], [0, 0, 0], [0, 1, 0]])


def test_mean_head_averages_both_heads():
    agm, ncm = np.array([0.2, 0.8]), np.array([0.6, 0.4])
    out = {"agm_probs": agm, "ncm_probs": ncm}
    np.testing.assert_allclose(eval_lib._head_probs(out, "mean"), [0.4, 0.6])
    assert eval_lib._head_probs(out, "agm") is agm and eval_lib._head_probs(out, "ncm") is ncm


def test_evaluation_uses_the_stages_test_prototypes():
    # SPEC §6: at test, base classes use the store's blend; evaluation must ask the
    # stage for them rather than use the support's static prototypes.
    class Stage:
        def test_prototypes(self, static, presence):
            return static + 1.0

    static = np.zeros((1, 3, 2), np.float32)
    np.testing.assert_array_equal(eval_lib.test_prototypes(Stage(), static, None), static + 1.0)
