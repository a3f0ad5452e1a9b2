r"""Train POPNet progressively (SPEC §6, §7) and print the SPEC §8 k-way table.

Usage:
    python -m popnet_tf.train --fold=1 --stage=3
    python -m popnet_tf.train --fold=2 --stage=3 --config=configs/paper.py \
        --config.data.dir=tfrecords/atr_os --workdir=workdirs/paper_fold2
    python -m popnet_tf.train --fold=1 --stage=3 --resume    # continue a killed run

With `--stage=3`, stages 1 and 2 are trained first when the workdir lacks them.
Any config value can be overridden: `--config.train.epochs=10`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from popnet_tf import cli

# Config files live in the repository's configs/ folder beside the package.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

try:  # with its default file, the flag applies sys.argv's --config.<key> overrides here
    _CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(_REPO, "configs", "synthetic_cpu.py"),
        "Experiment config file (ml_collections), optionally with ':variant'. "
        "Override values with --config.<key>=<value>.", lock_config=True)
except (AttributeError, KeyError) as _error:
    cli.exit_on_unknown_config_key(_error, sys.argv)
_FOLD = flags.DEFINE_enum("fold", "1", ["1", "2"], "Fold (SPEC §4): which classes are novel.")
_STAGE = flags.DEFINE_enum("stage", "3", ["1", "2", "3"],
                           "Stage to train (SPEC §3); earlier stages missing in the workdir are trained first.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Folder for checkpoints, TensorBoard logs and results "
                               "(default: workdirs/<config name>[_<variant>]_fold<F>).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue an interrupted run from its last checkpoint.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from popnet_tf import integrity, train_lib  # after flag parsing: keeps --help fast

    config = _CONFIG.value
    fold, stage = int(_FOLD.value), int(_STAGE.value)
    workdir = _WORKDIR.value or os.path.join("workdirs", f"{_config_name()}_fold{fold}")
    logging.info("Training stage %d, fold %d, in %s", stage, fold, workdir)
    try:
        summary = train_lib.train(config, workdir, stage=stage, fold=fold, resume=_RESUME.value)
    except train_lib.Preempted as e:  # the loop's own SIGTERM exception
        # 143 = 128 + SIGTERM: what a scheduler sees from a job that SIGTERM ended.
        sys.stderr.write(f"PREEMPTED {e}\n")
        sys.exit(143)
    except (integrity.RunError, FloatingPointError) as e:
        # Conditions of the run (damaged data, full disk, NaN loss, a workdir of another
        # fold), not bugs: the message says what to do, a traceback would bury it.
        raise SystemExit(f"FATAL {type(e).__name__}: {e}") from None
    print(train_lib.format_summary(summary, stage, fold, config.model.get("method", "popnet")))


def _config_name() -> str:
    flag = flags.FLAGS["config"]
    return cli.config_name(flag.config_filename if hasattr(flag, "config_filename") else "")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=cli.parse_flags)
