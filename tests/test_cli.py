"""popnet_tf/cli.py: a mistyped --config.<key> is one clear line, not a traceback."""

import os
import subprocess
import sys

import pytest

from popnet_tf import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.parametrize("error", [
    KeyError("'epoch'"),                                                  # older ml_collections
    AttributeError(KeyError("'epoch'\nDid you mean \"epochs\" instead of \"epoch\"?")),
])
def test_message_names_flag_field_and_hint(error):
    message = cli.unknown_config_key_message(error, ["train", "--fold=1", "--config.train.epoch=3"])
    assert message.startswith("FATAL Flags parsing error: --config.train.epoch: the config has "
                              "no field 'epoch'")
    assert "\\" not in message and "\n" not in message
    assert ("Did you mean \"epochs\"" in message) == ("Did you" in str(error.args[0]))
    assert message.endswith(f"({cli.CONFIG_FIELDS_HINT})")


@pytest.mark.parametrize("module, args", [
    ("popnet_tf.train", ["--config.train.epoch=3"]),                       # default config file
    ("popnet_tf.train", ["--config=configs/synthetic_cpu.py:smoke", "--config.trian.epochs=3"]),
    ("popnet_tf.evaluate", ["--workdir=nowhere", "--config=configs/synthetic_cpu.py:smoke",
                            "--config.eval.haed=agm"]),
])
def test_clis_refuse_unknown_config_key_in_one_line(module, args):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    wrong = [a for a in args if a.startswith("--config.")][0].split("=")[0]
    assert last.startswith(f"FATAL Flags parsing error: {wrong}: the config has no field "), last
    assert "Did you mean" in last, last


def test_train_without_built_dataset_fails_in_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "popnet_tf.train", "--config=configs/paper.py", "--fold=2",
         f"--config.data.dir={tmp_path / 'atr_os'}", f"--workdir={workdir}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"FATAL DatasetMissingError: {tmp_path / 'atr_os'}: no manifest.json. "
                           "Build the dataset first: python -m popnet_tf.data.build_atr_os"), last
    assert not workdir.exists()  # no run.json (nor folder) left behind


def test_default_workdir_stem_keeps_the_variant():
    assert cli.config_name("configs/synthetic_cpu.py") == "synthetic_cpu"
    assert cli.config_name("/abs/configs/synthetic_cpu.py:smoke") == "synthetic_cpu_smoke"
    assert cli.config_name("configs/baselines/panet.py:paper") == "panet_paper"
    assert cli.config_name("") == "run"


# Every CLI parses its flags before importing TensorFlow: --help is instant.
CLIS = ["popnet_tf.train", "popnet_tf.evaluate", "popnet_tf.export", "popnet_tf.predict",
        "popnet_tf.bench", "popnet_tf.data.synth", "popnet_tf.data.build_atr_os",
        "popnet_tf.data.show"]

# argv: a module name (runpy.run_module) or a script path (runpy.run_path) and which runner.
_RUN_HELP = """import runpy, sys
run = getattr(runpy, sys.argv[2])
sys.argv = [sys.argv[1], "--help"]
try:
    run(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("exit", e.code, "tensorflow" in sys.modules)
"""


@pytest.mark.parametrize("module", CLIS)
def test_help_exits_zero_without_importing_tensorflow_and_flag_errors_exit_one(module):
    shown = subprocess.run([sys.executable, "-c", _RUN_HELP, module, "run_module"], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=120)
    # absl alone exits 1 after --help
    assert shown.stdout.strip().splitlines()[-1] == "exit 0 False", shown.stdout[-2000:] + shown.stderr[-2000:]
    assert "flags:" in shown.stdout, shown.stdout[-2000:]
    refused = subprocess.run([sys.executable, "-m", module, "--no_such_flag=1"],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    wrong_value = subprocess.run([sys.executable, "-m", module, "--helpshort=maybe"],
                                 cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    for proc in (refused, wrong_value):
        assert proc.returncode == 1, proc.stdout[-1000:] + proc.stderr[-1000:]
        assert "FATAL Flags parsing error" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("script", ["study.py", "supervised_reference.py", "resolution_cap.py"])
def test_script_help_exits_zero_without_importing_tensorflow(script):
    # resolution_cap and supervised_reference imported TensorFlow first: --help took ~20 s.
    shown = subprocess.run([sys.executable, "-c", _RUN_HELP,
                            os.path.join(REPO, "scripts", script), "run_path"], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert shown.stdout.strip().splitlines()[-1] == "exit 0 False", shown.stdout[-2000:] + shown.stderr[-2000:]
