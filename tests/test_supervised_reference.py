"""scripts/supervised_reference.py and the dataset it trains on
(`episodes.supervised_train_dataset`), on the smoke config."""

import json
import math

import numpy as np
import pytest

from configs import synthetic_cpu
from popnet_tf import classes, train_lib
from popnet_tf.data import episodes
from tests.script_loader import load_script

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A smoke workdir with stage 1 trained (float32, fold 1)."""
    tmp = tmp_path_factory.mktemp("supervised_reference")
    config = synthetic_cpu.get_config("smoke")
    config.data.dir = str(tmp / "data")
    workdir = str(tmp / "work")
    train_lib.train(config, workdir, stage=1, fold=1)
    return workdir, config


def test_dataset_labels_stage3_with_novel_as_background(workdir):
    """Stage-3 labels with fold 1's novel classes (pants, shoes, legs) relabelled 0;
    stage 1's labels unchanged by the generalisation (the same batches as before)."""
    _, config = workdir
    common = dict(batch_size=2, crop_size=48, resize_long_side=64, seed=3)
    fine = next(iter(episodes.supervised_train_dataset(config.data.dir, stage=3, fold=1,
                                                       **common)))
    coarse = next(iter(episodes.stage1_train_dataset(config.data.dir, **common)))
    fine_mask, coarse_mask = fine["mask"].numpy(), coarse["mask"].numpy()
    np.testing.assert_array_equal(fine["image"].numpy(), coarse["image"].numpy())
    seen = set(np.unique(fine_mask)) - {classes.IGNORE_LABEL}
    assert seen and not seen & set(classes.novel_ids(3, 1, "paper"))
    assert len(seen) > 2                                   # fine classes, not 0/1
    # Wherever stage 1 says background, stage 3 does too (the novel classes add more).
    assert np.all(fine_mask[coarse_mask == 0] == 0)
    everything = next(iter(episodes.supervised_train_dataset(config.data.dir, stage=3,
                                                             **common)))
    assert set(np.unique(everything["mask"].numpy())) & set(classes.novel_ids(3, 1, "paper"))


def test_reference_starts_from_stage1_and_is_scored_kway(workdir, tmp_path):
    workdir, _ = workdir
    script = load_script("supervised_reference")
    config, fold = script.load_run_config(workdir)
    assert fold == 1
    model = script.build_reference(config, workdir)
    stage1 = train_lib.restore_stage(config, workdir, 1)
    for a, b in zip(model.encoder.weights, stage1.encoder.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)

    summary = script.run(workdir, steps=3, max_queries=2)
    assert summary["steps"] == 3 and summary["num_pairs"] == 2 * 10
    assert summary["head"] == "model" and summary["train_seconds"] > 0
    assert 0.0 <= summary["base_miou"] <= 1.0 and 0.0 <= summary["overall_acc"] <= 1.0
    assert np.array(summary["confusion_matrix"]).sum() > 0
    for name, parts in summary["error_breakdown"].items():
        if parts is not None:
            assert math.isclose(sum(parts.values()), 1.0, rel_tol=1e-9), name
    json.dumps(summary)  # what main() writes


def test_not_a_workdir_is_a_clear_error(tmp_path):
    script = load_script("supervised_reference")
    with pytest.raises(FileNotFoundError, match="run.json: not a POPNet workdir"):
        script.run(str(tmp_path), steps=10)
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        script.run(str(tmp_path), steps=0)


def test_unwritable_out_is_refused_before_training(tmp_path):
    """A folder at --out (or a file where its folder goes) used to end the run in a
    traceback after the whole training."""
    script = load_script("supervised_reference")
    with pytest.raises(IsADirectoryError, match="--out"):
        script.check_out(str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="file"):
        script.check_out(str(tmp_path / "file" / "steps1.json"))
    script.check_out(str(tmp_path / "new" / "steps1.json"))  # a new folder is fine


def test_damaged_run_json_is_named(tmp_path):
    (tmp_path / "run.json").write_text('{"fold": 1, "conf')
    with pytest.raises(ValueError, match="run.json: damaged"):
        load_script("supervised_reference").load_run_config(str(tmp_path))
