#!/usr/bin/env python
"""The study: POPNet, the paper's four baselines and the Table 3 ablation, trained and
evaluated on the synthetic benchmark, written up as docs/RESULTS.md.

Usage (from the repository root):
    python scripts/study.py --out docs/RESULTS.md                 # reduced scale (~25-40 min, 2 CPU cores)
    python scripts/study.py --out docs/RESULTS.md --scale cpu     # the configs as they are (many hours on CPU)
    python scripts/study.py --out /tmp/RESULTS.md --scale smoke   # minutes: checks the script
    python scripts/study.py --out docs/RESULTS.md --seeds 0,1,2   # several seeds, tables show the mean

Runs (each trained by popnet_tf.train_lib.train, evaluated by popnet_tf.eval_lib.evaluate):
- Tables 1 and 2: POPNet (configs/synthetic_cpu.py) and SG-One, PANet, AMP, Fine-tune
  (configs/baselines/) on folds 1 and 2, k-way and one-way. One model per (method,
  fold) is trained with k-way episodes and evaluated both ways (the paper trains its
  one-way models separately, on 576x576 one-way episodes; `--oneway_training` does).
- Table 3: the ablation rows (configs/ablations/) on fold 1, k-way; the last row is
  the POPNet run of Table 1.

Learning rates, epochs, batch size, image sizes and everything else come from the
configs, so the study follows their current values. `--scale reduced` divides
`train.steps_per_epoch` by REDUCE_STEPS (epochs, learning rates and the β / warm-up
schedules stay as configured) and scores fewer test pairs; `cpu` changes nothing.
Every scale turns off the per-epoch validation inside training (it selects nothing;
the study scores the final checkpoint). Stage 1 (supervised, identical for every
three-stage config of a fold and seed) is trained once and copied into the other
three-stage workdirs.

Outputs: `--out` (Markdown), `docs/results/<scale>/*.json` beside it (every run's
results.json and `study.json` with configs, seeds and wall times), workdirs under
`--workdirs/<scale>/`. A rerun reuses finished trainings and evaluations. Notes
written by hand in `docs/results/<scale>/notes.md` are included in the Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

REDUCE_STEPS = 10           # reduced scale: steps_per_epoch / 10
REDUCED_KWAY_QUERIES = 20   # reduced scale: 20 queries x 10 supports = 200 k-way pairs
REDUCED_ONEWAY_PAIRS = 5    # reduced scale: one-way pairs per class

MAIN = (  # (name, label in the tables, config file)
    ("popnet", "POPNet", "configs/synthetic_cpu.py"),
    ("sgone", "SG-One", "configs/baselines/sgone.py"),
    ("panet", "PANet", "configs/baselines/panet.py"),
    ("amp", "AMP", "configs/baselines/amp.py"),
    ("finetune", "Fine-tune", "configs/baselines/finetune.py"),
)
ABLATION = (
    ("agm", "AGM", "configs/ablations/agm.py"),
    ("ncm", "NCM", "configs/ablations/ncm.py"),
    ("dml", "DML", "configs/ablations/dml.py"),
    ("dml_ws", "DML + WS", "configs/ablations/dml_ws.py"),
    ("dml_ws_kim", "DML + WS + KIM", "configs/ablations/dml_ws_kim.py"),
    ("popnet", "DML + WS + KIM + DP", "configs/synthetic_cpu.py"),  # = POPNet, reused
)

# The paper's numbers (AAAI 2021 Tables 1-3, SPEC §9), percent, means as printed there
# (Table 2 prints POPNet's novel mean as 27.7, although its folds give 28.35).
PAPER_KWAY = {  # novel f1, f2, mean, human f1, f2, mean, overall acc
    "POPNet": (24.1, 19.4, 21.8, 60.6, 60.4, 60.5, 94.1),
    "SG-One": (0.0, 0.1, 0.1, 42.7, 46.0, 44.4, 91.6),
    "PANet": (12.6, 13.3, 13.0, 19.4, 17.1, 18.3, 78.8),
    "AMP": (8.5, 8.1, 8.3, 16.3, 15.4, 15.9, 67.6),
}
PAPER_ONEWAY = {  # novel f1, f2, mean, human f1, f2, mean, Bi-IoU
    "POPNet": (28.3, 28.4, 27.7, 51.1, 54.6, 52.8, 71.4),
    "SG-One": (4.0, 0.7, 2.4, 39.0, 40.5, 39.8, 66.0),
    "PANet": (5.1, 3.2, 4.2, 14.0, 13.9, 14.0, 49.5),
    "AMP": (8.4, 9.4, 8.8, 15.0, 15.0, 15.0, 50.7),
    "Fine-tune": (0.3, 0.2, 0.3, 14.8, 15.0, 14.9, 49.1),
}
PAPER_ABLATION = {  # novel, human (fold 1)
    "AGM": (1.0, 40.2), "NCM": (3.5, 40.4), "DML": (15.1, 47.9), "DML + WS": (18.6, 47.1),
    "DML + WS + KIM": (20.0, 52.5), "DML + WS + KIM + DP": (24.1, 60.6),
}


def load_config(path: str, scale: str):
    """`get_config` of a config file, with the variant of the scale ("smoke" or none)."""
    spec = importlib.util.spec_from_file_location(f"study_config_{abs(hash(path))}",
                                                  os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke" if scale == "smoke" else None)


def apply_scale(config, scale: str, seed: int, oneway_training: bool = False,
                reduce_steps: int = REDUCE_STEPS):
    """The study's changes to a config: seed, training-time validation off, and the
    reduced scale's fewer steps per epoch. Returns (config, eval kwargs, changes)."""
    changes = {}
    config.seed = seed
    config.train.validate_every = 0         # selects nothing; the study scores the end
    config.eval.max_queries = 2             # the training's own end-of-stage check only
    if oneway_training:
        config.train.way = "oneway"
        changes["train.way"] = "oneway"
    kway_queries = 0  # all of q_test
    pairs = config.eval.oneway_pairs_per_class
    if scale == "reduced":
        for key in ("steps_per_epoch", "stage1_steps_per_epoch"):
            old = config.train.get(key, 0)
            if old:  # stage1_steps_per_epoch 0 means "as steps_per_epoch"
                config.train[key] = max(1, math.ceil(old / reduce_steps))
                changes[f"train.{key}"] = f"{old} -> {config.train[key]}"
        kway_queries, pairs = REDUCED_KWAY_QUERIES, min(pairs, REDUCED_ONEWAY_PAIRS)
    elif scale == "smoke":
        kway_queries, pairs = 2, 1
    return config, {"max_queries": kway_queries, "pairs_per_class": pairs}, changes


def _stage1_key(config, fold: int) -> str:
    """What stage 1 depends on: two configs with the same key train the same stage 1."""
    from popnet_tf.models import popnet

    return json.dumps([fold, config.seed, popnet.encoder_kwargs(config), config.data.to_dict(),
                       config.train.to_dict()], sort_keys=True, default=str)


def train_run(config, workdir: str, fold: int, stage1_cache: dict) -> float:
    """Trains stage 3 (and the stages it needs) unless finished; returns seconds spent."""
    from popnet_tf import train_lib
    from popnet_tf.models import popnet

    if train_lib.stage_finished(workdir, 3):
        return 0.0
    needs_stage1 = 1 in popnet.stages_needed(config, 3)
    key = _stage1_key(config, fold)
    source = stage1_cache.get(key)
    target = train_lib.stage_dir(workdir, 1)
    if needs_stage1 and source and source != workdir and not os.path.exists(target):
        shutil.copytree(train_lib.stage_dir(source, 1), target)  # same config: same stage 1
    start = time.time()
    train_lib.train(config, workdir, stage=3, fold=fold, resume=True)
    if needs_stage1:
        stage1_cache.setdefault(key, workdir)
    return time.time() - start


def evaluate_run(workdir: str, way: str, eval_kwargs: dict) -> dict:
    from popnet_tf import eval_lib

    path = os.path.join(eval_lib.eval_dir(workdir, int(_fold_of(workdir)), way), eval_lib.RESULTS_FILE)
    results = _saved_results(path)
    if results is not None and _reusable(results, workdir, way, eval_kwargs):
        return results
    kwargs = ({"max_queries": eval_kwargs["max_queries"]} if way == "kway"
              else {"pairs_per_class": eval_kwargs["pairs_per_class"]})
    return eval_lib.evaluate(workdir, way=way, progress=False, num_examples=6, **kwargs)


def _reusable(results: dict, workdir: str, way: str, eval_kwargs: dict) -> bool:
    """Whether an earlier results.json is this study's evaluation: the same counts, the
    stage's latest checkpoint, and the training's own config. A user's `evaluate` with
    another head or dynamic_prototypes=False (`--config.…`) writes to the same folder, and
    its numbers were reused under the method's name when only the counts were compared."""
    import tensorflow as tf

    from popnet_tf import eval_lib, train_lib

    count = "max_queries" if way == "kway" else "pairs_per_class"
    if results.get(count) != eval_kwargs[count]:
        return False
    config, _ = eval_lib.load_run(workdir)
    latest = tf.train.latest_checkpoint(train_lib.checkpoint_dir(workdir, 3))
    return (results.get("checkpoint") == latest and not results.get("foreground_gate")
            and results.get("config") == json.loads(json.dumps(config.to_dict())))


def _saved_results(path: str) -> dict | None:
    """An earlier evaluation's results.json, or None when there is none or it is damaged
    (a killed write, an edit): evaluated again rather than ending the study in a
    JSONDecodeError traceback hours into it."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        from absl import logging

        logging.warning("%s: unreadable (%s); evaluating again", path, e)
        return None
    return results if isinstance(results, dict) else None


def _fold_of(workdir: str) -> int:
    with open(os.path.join(workdir, "run.json")) as f:
        return json.load(f)["fold"]


# ----------------------------------------------------------------------------- tables
def _pct(values) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    mean = 100 * sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    sd = 100 * math.sqrt(sum((v - mean / 100) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.1f} ± {sd:.1f}"


def _metric(records, label, fold, way, key):
    return [r["results"][key] for r in records
            if r["label"] == label and r["fold"] == fold and r["way"] == way and r["part"] == "main"]


def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _fold_means(per_fold: dict) -> list:
    """{fold: [value per seed]} -> [mean over folds, per seed]."""
    count = max((len(v) for v in per_fold.values()), default=0)
    return [_mean([v[i] for v in per_fold.values() if i < len(v)]) for i in range(count)]


def _change(before: float, after: float) -> str:
    """'helps' / 'hurts' / 'tie' for a change of a metric (fractions), ties below 0.05 points."""
    if abs(after - before) < 0.0005:
        return "tie"
    return "helps" if after > before else "hurts"


def table_main(records, way: str, folds) -> str:
    last = "overall acc" if way == "kway" else "Bi-IoU"
    last_key = "overall_acc" if way == "kway" else "bi_iou"
    paper = PAPER_KWAY if way == "kway" else PAPER_ONEWAY
    lines = ["| Method | Novel F1 | Novel F2 | Novel mean | Human F1 | Human F2 | Human mean | "
             f"{last} | paper novel mean | paper human mean | paper {last} |",
             "|---|" + "---|" * 10]
    for _, label, _ in MAIN:
        novel = {f: _metric(records, label, f, way, "novel_miou") for f in folds}
        human = {f: _metric(records, label, f, way, "human_miou") for f in folds}
        if not any(novel.values()):
            continue
        # Means over folds, one per seed (so ± is over seeds, never over folds).
        tail = _fold_means({f: _metric(records, label, f, way, last_key) for f in folds})
        novel_mean, human_mean = _fold_means(novel), _fold_means(human)
        p = paper.get(label)
        paper_cells = [f"{p[2]:.1f}", f"{p[5]:.1f}", f"{p[6]:.1f}"] if p else ["—", "—", "—"]
        lines.append("| " + " | ".join([
            label, _pct(novel.get(1, [])), _pct(novel.get(2, [])), _pct(novel_mean),
            _pct(human.get(1, [])), _pct(human.get(2, [])), _pct(human_mean), _pct(tail),
            *paper_cells]) + " |")
    return "\n".join(lines) + "\n"


def table_ablation(records) -> str:
    lines = ["| Methods | Novel MIoU | Base MIoU | Human MIoU | paper novel | paper human |",
             "|---|---|---|---|---|---|"]
    for _, label, _ in ABLATION:
        rows = [r for r in records if r["part"] == "ablation" and r["label"] == label]
        if not rows:
            continue
        p = PAPER_ABLATION[label]
        lines.append("| " + " | ".join([
            label, _pct([r["results"]["novel_miou"] for r in rows]),
            _pct([r["results"]["base_miou"] for r in rows]),
            _pct([r["results"]["human_miou"] for r in rows]), f"{p[0]:.1f}", f"{p[1]:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def findings(records, folds) -> str:
    """The paper's claims checked on our numbers, mechanically (yes / no)."""
    out = []
    for way in ("kway", "oneway"):
        for key, name in (("novel_miou", "novel"), ("human_miou", "human")):
            means = {label: _mean([_mean(_metric(records, label, f, way, key)) for f in folds])
                     for _, label, _ in MAIN}
            means = {k: v for k, v in means.items() if not math.isnan(v)}
            if not means:
                continue
            ranking = sorted(means, key=means.get, reverse=True)
            verdict = "yes" if ranking[0] == "POPNet" else "no"
            out.append(f"- {way}: POPNet first on {name} MIoU (mean of folds)? **{verdict}** — "
                       + ", ".join(f"{k} {100 * means[k]:.2f}" for k in ranking))
    rows = []
    for _, label, _ in ABLATION:
        got = [r["results"] for r in records if r["part"] == "ablation" and r["label"] == label]
        if got:
            rows.append((label, _mean([g["novel_miou"] for g in got]), _mean([g["human_miou"] for g in got])))
    for (a, an, ah), (b, bn, bh) in zip(rows, rows[1:]):
        out.append(f"- ablation, {a} → {b}: novel {100 * an:.2f} → {100 * bn:.2f} "
                   f"({_change(an, bn)}), human {100 * ah:.2f} → {100 * bh:.2f} ({_change(ah, bh)})")
    return "\n".join(out) + "\n"


def runs_table(records) -> str:
    lines = ["| part | run | config | fold | seed | steps/epoch × epochs (stage 1) | optimizer, lr | batch | "
             "train s | way | pairs | eval s | results |", "|---|" + "---|" * 12]
    for r in records:
        c = r["results"]["config"]
        t = c["train"]
        lines.append("| " + " | ".join(str(x) for x in [
            r["part"], r["name"], f"`{r['config_file']}`", r["fold"], r["seed"],
            f"{t['steps_per_epoch']} × {t['epochs']} "
            f"({t.get('stage1_steps_per_epoch') or t['steps_per_epoch']} × {t['stage1_epochs']})",
            f"{t['optimizer']} {t['learning_rate']}", t["batch_size"], f"{r['train_s']:.0f}", r["way"],
            r["results"]["num_pairs"], f"{r['results']['wall_time_s']:.0f}",
            f"`{r['json']}`"]) + " |")
    return "\n".join(lines) + "\n"


def git_state() -> str:
    """The commit the study ran on, and whether the working tree differed from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head}" + (f", with uncommitted changes in {', '.join(dirty)}" if dirty else "")


def _wall_time_sentence(total_s: float, reused_runs: int) -> str:
    """How long the study took; a rerun that reused finished trainings says so, since
    their time is not in the figure."""
    if reused_runs:
        return (f"this invocation took **{total_s / 60:.1f} minutes** of wall time and reused "
                f"{reused_runs} training run(s) finished by an earlier one (not counted).")
    return f"the study took **{total_s / 60:.1f} minutes** of wall time."


def write_markdown(path: str, records, args, changes, total_s: float, results_dir: str,
                   git: str = "", command: str = "", reused_runs: int = 0) -> None:
    folds = sorted({r["fold"] for r in records if r["part"] == "main"})
    notes_path = os.path.join(results_dir, "notes.md")
    notes = open(notes_path).read() if os.path.exists(notes_path) else "(none yet)\n"
    rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(path)))
    scale_text = {
        "reduced": (f"**Reduced scale**: `train.steps_per_epoch` divided by {args.reduce} "
                    f"(every other training value as configured), k-way scored on the first "
                    f"{REDUCED_KWAY_QUERIES} q_test queries × the 10 supports, one-way on "
                    f"{REDUCED_ONEWAY_PAIRS} pairs per class. Changes: "
                    + ", ".join(f"`{k}` {v}" for k, v in changes.items()) + "."),
        "cpu": "**CPU scale**: the configs exactly as they are; all q_test queries.",
        "smoke": "**Smoke scale**: the configs' `smoke` variants, a check of the script only.",
    }[args.scale]
    with open(path, "w") as f:
        f.write(f"""# Results: POPNet and the paper's baselines on the synthetic benchmark

Written by `{command}`
on {datetime.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()} CPU cores, no GPU;
{git});
{_wall_time_sentence(total_s, reused_runs)} Every number below comes from
those runs; each run's results.json (metrics, config, checkpoint, wall time) is in
`{rel}/`. Metrics are SPEC §8 in percent, from one confusion matrix per run; the paper's
values (ATR-OS, Xception, GPU, SPEC §9) are given beside ours for orientation only: the
data (synthetic people), backbone (`small`, random init) and training length differ.

{scale_text}
Per-epoch validation inside training is off (it selects nothing). Seeds: {args.seeds}
(with several seeds a cell is mean ± sample s.d. over seeds). Model trained on k-way
episodes{' (one-way episodes for one-way: --oneway_training)' if args.oneway_training else
           ' and scored both ways (the paper trains separate one-way models)'}.

## Table 1 — k-way OSHP
{table_main(records, "kway", folds)}
## Table 2 — one-way OSHP
{table_main(records, "oneway", folds)}
## Table 3 — ablation, fold 1, k-way
{table_ablation(records)}
## The paper's findings, checked on these numbers
{findings(records, folds)}
## Notes
{notes}
## Every run
{runs_table(records)}""")


def render_only(args) -> None:
    """The Markdown again from docs/results/<scale>/study.json and the runs' JSON."""
    results_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "results", args.scale)
    with open(os.path.join(results_dir, "study.json")) as f:
        study = json.load(f)
    records = []
    for run in study["runs"]:
        with open(os.path.join(REPO, run["json"])) as f:
            records.append({**{k: v for k, v in run.items() if k != "metrics"}, "results": json.load(f)})
    args.seeds = ",".join(str(s) for s in study["seeds"])
    write_markdown(args.out, records, args, study["changes"], study["wall_time_s"], results_dir,
                   study.get("git", ""), "python " + study["command"],
                   reused_runs=study.get("reused_runs", 0))


def _from_repo(path: str) -> str:
    """The caller's path as seen from the repository: relative inside it (so that the
    results keep repository-relative paths), absolute outside."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, REPO]) == REPO
    return os.path.relpath(path, REPO) if inside else path


def _integers(text: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        return None


def check_args(parser, args) -> None:
    """One line (parser.error, exit status 2) for a flag value that would run nothing
    or fail late: an unknown method ran no main run and wrote no tables, --reduce 0
    divided by zero at the first run and a negative one ran 1 step an epoch."""
    methods = {n for n, _, _ in MAIN}
    unknown = set(args.methods.split(",")) - methods
    if unknown:
        parser.error(f"--methods: unknown method(s) {', '.join(sorted(unknown))}; "
                     f"choose from {','.join(n for n, _, _ in MAIN)}")
    if args.reduce < 1:
        parser.error(f"--reduce={args.reduce}: must be >= 1 (steps per epoch are divided by it)")
    folds = _integers(args.folds)
    if folds is None or not set(folds) <= {1, 2}:
        parser.error(f"--folds={args.folds}: a comma list of 1 and 2")
    if _integers(args.seeds) is None:
        parser.error(f"--seeds={args.seeds}: a comma list of integers")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1] + "\n\nWhat each scale runs: see the top of scripts/study.py.",
        formatter_class=type("Formatter", (argparse.ArgumentDefaultsHelpFormatter,
                                           argparse.RawDescriptionHelpFormatter), {}))
    parser.add_argument("--out", default="docs/RESULTS.md", help="Markdown file to write.")
    parser.add_argument("--scale", choices=("smoke", "reduced", "cpu"), default="reduced",
                        help="smoke: minutes, checks the script; reduced: the configs' steps per "
                             "epoch divided by --reduce and fewer test pairs; cpu: the configs "
                             "as they are (many hours).")
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds.")
    parser.add_argument("--reduce", type=int, default=REDUCE_STEPS,
                        help="Reduced scale: divide the configs' steps per epoch by this "
                             "(the workdirs are per scale, so use a new --workdirs when "
                             "changing it).")
    parser.add_argument("--workdirs", default="workdirs/study", help="Root of the runs' workdirs.")
    parser.add_argument("--parts", default="main,ablation",
                        help="Comma list of the parts to run: main (Tables 1 and 2), "
                             "ablation (Table 3).")
    parser.add_argument("--folds", default="1,2", help="Folds of the main comparison.")
    parser.add_argument("--methods", default=",".join(n for n, _, _ in MAIN),
                        help="Methods of the main comparison.")
    parser.add_argument("--oneway_training", action="store_true",
                        help="Train separate one-way models for Table 2 (paper protocol).")
    parser.add_argument("--render_only", action="store_true",
                        help="Rewrite --out from the saved results of --scale (after editing "
                             "notes.md); runs nothing.")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - {"main", "ablation"}
    if unknown:  # else a typo would run nothing and write empty tables
        parser.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}; "
                     "give main, ablation or main,ablation")
    check_args(parser, args)
    # Relative paths are the caller's: main() changes into the repository below, where
    # they used to land instead (`--out x.md` from /tmp wrote <repo>/x.md).
    args.out, args.workdirs = _from_repo(args.out), _from_repo(args.workdirs)
    if args.render_only:
        return render_only(args)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.chdir(REPO)  # configs name their dataset relative to the repository
    import keras
    from absl import logging

    from popnet_tf import train_lib

    logging.set_verbosity(logging.INFO)
    seeds = [int(s) for s in args.seeds.split(",")]
    folds = [int(f) for f in args.folds.split(",")]
    parts = set(args.parts.split(","))
    methods = set(args.methods.split(","))
    results_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "results", args.scale)
    os.makedirs(results_dir, exist_ok=True)
    plan = []  # (part, name, label, config file, fold, ways)
    if "main" in parts:
        plan += [("main", n, l, c, f, ("kway", "oneway")) for f in folds for n, l, c in MAIN if n in methods]
    if "ablation" in parts:
        plan += [("ablation", n, l, c, 1, ("kway",)) for n, l, c in ABLATION]
    # Every config read now: a config file edited while the study runs changes nothing.
    loaded = {c: load_config(c, args.scale) for _, _, _, c, _, _ in plan}
    records, stage1_cache, changes, reused = [], {}, {}, 0
    git = git_state()
    start = time.time()
    for seed in seeds:
        for part, name, label, config_file, fold, ways in plan:
            config, eval_kwargs, changes = apply_scale(loaded[config_file].copy_and_resolve_references(),
                                                       args.scale, seed, reduce_steps=args.reduce)
            workdir = os.path.join(args.workdirs, args.scale, f"{name}_fold{fold}_seed{seed}")
            logging.info("Study: %s %s fold %d seed %d -> %s", part, name, fold, seed, workdir)
            train_s = train_run(config, workdir, fold, stage1_cache)
            reused += train_s == 0.0  # finished by an earlier invocation
            ways_here = list(ways)
            for way in ways_here:
                oneway_dir = None
                if way == "oneway" and args.oneway_training:
                    oneway_config, _, _ = apply_scale(loaded[config_file].copy_and_resolve_references(),
                                                      args.scale, seed, oneway_training=True,
                                                      reduce_steps=args.reduce)
                    oneway_dir = workdir + "_oneway"
                    train_s += train_run(oneway_config, oneway_dir, fold, {})
                results = evaluate_run(oneway_dir or workdir, way, eval_kwargs)
                json_name = f"{part}_{name}_fold{fold}_seed{seed}_{way}.json"
                train_lib.write_json_atomic(os.path.join(results_dir, json_name), results)
                records.append({"part": part, "name": name, "label": label, "fold": fold,
                                "seed": seed, "way": way, "config_file": config_file,
                                "train_s": train_s, "results": results,
                                "json": os.path.relpath(os.path.join(results_dir, json_name))})
                train_s = 0.0  # counted once per run
            keras.backend.clear_session()
            # Markdown after every run: an interrupted study still leaves its tables.
            total = time.time() - start
            write_markdown(args.out, records, args, changes, total, results_dir, git,
                           "python " + " ".join(sys.argv), reused_runs=reused)
            train_lib.write_json_atomic(os.path.join(results_dir, "study.json"), {
                "command": " ".join(sys.argv), "scale": args.scale, "seeds": seeds, "git": git,
                "wall_time_s": round(total, 1), "reused_runs": reused, "changes": changes,
                "runs": [{k: v for k, v in r.items() if k != "results"} |
                         {"metrics": {k: r["results"].get(k) for k in
                                      ("novel_miou", "base_miou", "human_miou", "overall_acc",
                                       "bi_iou", "num_pairs", "wall_time_s")}}
                         for r in records]})
    logging.info("Study done in %.1f min: %s", (time.time() - start) / 60, args.out)


if __name__ == "__main__":
    main()
