"""What the command-line tools share: one clear line for a mistyped `--config.<key>`, exit
status 0 after `--help`, and the default workdir's name (`config_name`).

ml_collections raises a KeyError (wrapped in an AttributeError, its text escaped and
followed by a "Did you mean" hint) for an override of a field the config does not have,
either while absl parses the flags or, for a config flag with a default file, when the
flag is defined. Both end up here as `FATAL Flags parsing error: --config.train.epoch: the
config has no field 'epoch'. Did you mean "epochs" instead of "epoch"? (...)`, exit 1.

Example:
    >>> app.run(main, flags_parser=cli.parse_flags)
"""

from __future__ import annotations

import os
import re
import sys

from absl import app

CONFIG_FIELDS_HINT = "the fields and their meaning are in configs/common.py"


def _innermost_text(error: BaseException) -> str:
    """The message of the innermost exception ml_collections wrapped."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return str(error.args[0]) if error.args else str(error)


def unknown_config_key_message(error: BaseException, argv) -> str:
    """One line naming the --config.<key> flag, the unknown field and the library's hint."""
    text = _innermost_text(error)
    match = re.match(r"""\s*['"]?([^'"\n]+)['"]?""", text)
    key = match.group(1) if match else text
    hint = next((line.strip() for line in text.splitlines() if line.strip().startswith("Did you")), "")
    flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
                 and key in a.split("=", 1)[0][len("--config."):].split(".")), "--config.*")
    return (f"FATAL Flags parsing error: {flag}: the config has no field {key!r}"
            f"{'. ' + hint if hint else ''} ({CONFIG_FIELDS_HINT})")


def exit_on_unknown_config_key(error: BaseException, argv) -> None:
    sys.stderr.write(unknown_config_key_message(error, argv) + "\n")
    sys.exit(1)


def parse_flags(argv):
    """absl's flag parsing (`app.run(..., flags_parser=parse_flags)`), with one line and
    exit status 1 for an unknown --config.<key> instead of a traceback, and exit status 0
    after --help / --helpfull (absl exits 1, which makes `tool --help && ...` fail)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        exit_on_unknown_config_key(e, argv)
    except SystemExit as e:
        # absl raises SystemExit(1) both after printing the usage for a help flag and after
        # a flag error; only the error's exit happens while handling another exception.
        if e.code == 1 and e.__context__ is None:
            sys.exit(0)
        raise


def config_name(config_flag: str) -> str:
    """The default workdir's stem: the config file's name, with its variant if any
    ("configs/synthetic_cpu.py" -> "synthetic_cpu", "...py:smoke" -> "synthetic_cpu_smoke"),
    so that a variant never trains into the default run's workdir."""
    path, _, variant = (config_flag or "").partition(":")
    name = os.path.splitext(os.path.basename(path))[0] or "run"
    return f"{name}_{variant}" if variant else name
