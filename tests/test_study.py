"""scripts/study.py: its help and what its Markdown says of the wall time. (The study
itself takes minutes even at smoke scale: run `python scripts/study.py --scale smoke`.)"""

import os
import subprocess
import sys

import pytest

from tests.script_loader import REPO, load_script


def test_wall_time_sentence_says_when_runs_were_reused():
    study = load_script("study")
    assert study._wall_time_sentence(90, 0) == "the study took **1.5 minutes** of wall time."
    reused = study._wall_time_sentence(90, 3)
    assert reused.startswith("this invocation took **1.5 minutes**") and "reused 3 training" in reused


def test_help_explains_every_option_with_its_default():
    proc = subprocess.run([sys.executable, "scripts/study.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "trained and evaluated on the synthetic benchmark, written up as docs/RESULTS.md" in text
    for option in ("--out", "--scale", "--seeds", "--reduce", "--workdirs", "--parts", "--folds",
                   "--methods", "--oneway_training", "--render_only"):
        assert option in text, option
    assert "(default: main,ablation)" in text and "(default: reduced)" in text
    assert "smoke: minutes" in text


def test_unknown_part_is_refused_before_any_run(capsys):
    study = load_script("study")
    with pytest.raises(SystemExit) as refused:
        study.main(["--parts", "both", "--out", "/nonexistent/RESULTS.md"])
    assert refused.value.code == 2
    assert "--parts: unknown part(s) both; give main, ablation or main,ablation" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--methods", "pannet"], "--methods: unknown method(s) pannet"),   # ran nothing, rc 0
    (["--reduce", "0"], "--reduce=0: must be >= 1"),                      # ZeroDivisionError late
    (["--folds", "3"], "--folds=3"), (["--seeds", "a"], "--seeds=a")])
def test_bad_values_are_refused_before_any_run(capsys, tmp_path, monkeypatch, args, message):
    study = load_script("study")
    monkeypatch.setattr(study, "train_run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exit_info:
        study.main([*args, "--out", str(tmp_path / "RESULTS.md"), "--workdirs", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_relative_paths_are_the_callers(tmp_path, monkeypatch):
    """main() changes into the repository; relative --out / --workdirs used to land there."""
    study = load_script("study")
    monkeypatch.chdir(tmp_path)
    assert study._from_repo("out.md") == str(tmp_path / "out.md")
    monkeypatch.chdir(study.REPO)
    assert study._from_repo("docs/RESULTS.md") == os.path.join("docs", "RESULTS.md")


def test_damaged_saved_results_are_evaluated_again(tmp_path, monkeypatch):
    """A damaged results.json of an earlier invocation ended the study in a traceback."""
    study = load_script("study")
    from popnet_tf import eval_lib

    (tmp_path / "run.json").write_text('{"fold": 1}')
    out = tmp_path / "eval" / "fold1_kway"
    out.mkdir(parents=True)
    (out / "results.json").write_text('{"max_queries": 2')
    monkeypatch.setattr(eval_lib, "evaluate", lambda *a, **k: {"again": True})
    assert study.evaluate_run(str(tmp_path), "kway", {"max_queries": 2}) == {"again": True}


def test_saved_results_of_another_evaluation_are_not_reused(tmp_path, monkeypatch):
    """Only the study's own evaluation is reused: a user's `evaluate` with another head
    (or other eval-time config) writes to the same folder, and used to be reused because
    its counts matched."""
    import json

    study = load_script("study")
    from popnet_tf import eval_lib

    config = {"model": {"method": "popnet"}, "eval": {"head": "ncm"}}
    (tmp_path / "run.json").write_text(json.dumps({"fold": 1, "config": config}))
    checkpoints = tmp_path / "stage3" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "ckpt-9.index").write_bytes(b"")
    (checkpoints / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')
    out = tmp_path / "eval" / "fold1_kway"
    out.mkdir(parents=True)
    ours = {"max_queries": 2, "checkpoint": str(checkpoints / "ckpt-9"), "config": config,
            "foreground_gate": False}
    monkeypatch.setattr(eval_lib, "evaluate", lambda *a, **k: {"again": True})
    for saved, reused in [(ours, True),
                          ({**ours, "config": {**config, "eval": {"head": "agm"}}}, False),
                          ({**ours, "checkpoint": str(checkpoints / "ckpt-3")}, False),
                          ({**ours, "max_queries": 5}, False)]:
        (out / "results.json").write_text(json.dumps(saved))
        got = study.evaluate_run(str(tmp_path), "kway", {"max_queries": 2})
        assert (got == saved) == reused and (got == {"again": True}) != reused, saved
