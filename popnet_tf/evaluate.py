"""Evaluate a trained workdir: the SPEC §5 test protocol and the §8 metrics.

Usage:
    python -m popnet_tf.evaluate --workdir workdirs/synthetic_cpu_fold1 --way kway
    python -m popnet_tf.evaluate --workdir W --fold 1 --way oneway --pairs_per_class 50
    python -m popnet_tf.evaluate --workdir W --way kway --max_queries 20   # a quick look
    python -m popnet_tf.evaluate --workdir W --way oneway --foreground_gate  # gated by stage 1

The config and fold are those recorded in `W/run.json` by training. `--config`
replaces the config, and only with it given can `--config.<key>=<value>` override
one value (`--config=configs/synthetic_cpu.py --config.eval.head=agm`); it must keep
the training's fold set, method and KIM (else the checkpoint would be scored as
another model or with other novel classes: refused), and its dataset must be the one
trained on (run.json's fingerprint; a moved copy is fine). Writes
`W/eval/fold<F>_<way>/` (`fold<F>_<way>_stage2/` with `--stage 2`):
    results.json   the §8 metrics as fractions 0–1 (human_miou, novel_miou,
                   base_miou, overall_acc, bi_iou for one-way, per_class_iou by
                   class name), head, num_pairs, method, config, checkpoint,
                   wall time, and the k-way confusion matrix
    table.md       the same in percent, as the paper's tables
    gallery.png    episodes: support with mask | query | ground truth | prediction
(`W/eval/fold<F>_<way>_foreground_gate/` with `--foreground_gate`: the head's
probabilities gated by stage 1's human probability, `stages.gate_by_foreground`; not
part of SPEC §6, whose NCM prediction is the default) and the metrics and gallery rows to TensorBoard under `W/tensorboard/eval_fold<F>_<way>/` (`..._foreground_gate/` when gated, so
that both runs show side by side).

The work is done by `eval_lib.evaluate` (this module is the command line only):
k-way scoring encodes each of the ten supports once and each query once
(`eval_lib.evaluate_kway`). The Fine-tune baseline is the exception: its weights
change per support, so it is tuned on each support and then runs every query
(`eval_lib.finetune_kway`, `eval_lib.finetune_oneway`).

Example (from Python):
    >>> from popnet_tf import eval_lib
    >>> results = eval_lib.evaluate("workdirs/synthetic_cpu_fold1", way="kway")
    >>> results["novel_miou"], results["num_pairs"]
"""

from __future__ import annotations

import os
import sys

from absl import logging

# TensorFlow is imported (through eval_lib) only after the flags are parsed: --help is instant.
WAYS = ["kway", "oneway"]  # eval_lib.WAYS


# ----------------------------------------------------------------------------- CLI
def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config replacing the one in <workdir>/run.json (optional); "
        "with it, --config.<key>=<value> overrides one value (not without --config). "
        "Its data.fold_set, model.method and model.kim must be the training's; "
        "eval-time values (eval.head, model.dynamic_prototypes, data.dir of a moved "
        "dataset) may differ.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Training workdir to evaluate.", required=True)
    flags.DEFINE_enum("fold", None, ["1", "2"], "Fold (default: the one in run.json; "
                      "any other is refused, since the novel classes would be wrong).")
    flags.DEFINE_enum("way", "kway", WAYS, "k-way (ten supports) or one-way OSHP (SPEC §5).")
    flags.DEFINE_enum("stage", "3", ["2", "3"], "One-shot stage to score (3: the 12 classes; 2: the "
                      "5 areas, written to W/eval/fold<F>_<way>_stage2/).")
    flags.DEFINE_integer("max_queries", None, "k-way: q_test queries to use "
                         "(default: config.eval.max_queries; 0 = all).")
    flags.DEFINE_integer("pairs_per_class", None, "one-way: pairs per class "
                         "(default: config.eval.oneway_pairs_per_class).")
    flags.DEFINE_integer("num_examples", 6, "Episodes in the gallery and TensorBoard "
                         "(0: none, and no gallery.png).")
    flags.DEFINE_bool("foreground_gate", None, "Gate the prediction by stage 1's human "
                      "probability, so that background cannot take a class (default: "
                      "config.eval.foreground_gate, off: SPEC §6's NCM prediction). Results "
                      "go to W/eval/fold<F>_<way>_foreground_gate/.")


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from popnet_tf import eval_lib

    f = flags.FLAGS
    try:
        results = eval_lib.evaluate(f.workdir, way=f.way, fold=int(f.fold) if f.fold else None,
                           config=f.config, stage=int(f.stage), max_queries=f.max_queries,
                           pairs_per_class=f.pairs_per_class, foreground_gate=f.foreground_gate,
                           num_examples=f.num_examples)
    except (OSError, ValueError) as e:
        # Mistakes and conditions, not bugs (no workdir or checkpoint, a damaged run.json or
        # dataset, a --config of another training, an unwritable W/eval: WorkdirError is an
        # OSError): one line naming the file or flag, exit status 1.
        raise SystemExit(f"FATAL {type(e).__name__}: {e}") from None
    print(eval_lib.format_results(results))
    print(f"Written to {eval_lib.eval_dir(f.workdir, results['fold'], results['way'], results.get('foreground_gate', False), results['stage'])}")


if __name__ == "__main__":
    # Config files import `configs`, which lives beside the package.
    _repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _repo not in sys.path:
        sys.path.insert(0, _repo)
    from absl import app

    from popnet_tf import cli

    _define_flags()
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=cli.parse_flags)
