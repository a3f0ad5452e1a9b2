"""Export a trained workdir as a versioned SavedModel that TF Serving loads as it is.

Usage:
    python -m popnet_tf.export --workdir workdirs/synthetic_cpu_fold1 --out exported/popnet
    python -m popnet_tf.export --workdir W --out DIR --version 7 --mask_values merged
    python -m popnet_tf.export --workdir W --out DIR --foreground_gate   # stage 1 gates the parts

Writes DIR/<version>/ (default version: 1 + the largest existing one) with the
last trained stage (its earlier stages and the prototype store inside) and two
signatures: `serving_default` (JPEG/PNG bytes) and `parse_images` (tensors);
see `popnet_tf.serving` and the README's "Export and serving" section.
"""

from __future__ import annotations

from absl import app, flags, logging

def _define_flags():
    """The CLI's flags (defined on demand, so importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "Training workdir (W/run.json, W/stage<N>/).")
    flags.DEFINE_string("out", None, "Model base folder: the version is written in "
                        "<out>/<version>/ (TF Serving's --model_base_path).")
    flags.DEFINE_integer("version", None, "Version folder (default: 1 + the largest existing one).")
    flags.DEFINE_enum("stage", None, ["2", "3"], "Stage to export (default: the last trained one).")
    flags.DEFINE_enum(
        "mask_values", "user", ["user", "merged"],
        "user: a support mask's values 1-254 are the classes, with static prototypes (a user's "
        "classes are new to the model); merged: values are ATR-OS merged ids 0-11 (a stage-2 "
        "export: its area ids 1 head, 2 body, 3 arms, 4 legs, so a merged-id mask would be "
        "misread) and base classes use the dynamic prototype store, as in evaluation.")
    flags.DEFINE_enum("head", None, ["ncm", "agm", "mean"], "Prediction head: ncm "
                      "(nearest centroid, SPEC §6), agm (attention guidance) or mean (the mean "
                      "of both heads' probabilities) (default: the config's eval.head, ncm).")
    flags.DEFINE_bool("foreground_gate", None, "Gate the head by stage 1's human probability, "
                      "so that background cannot take a one-shot class (default: the config's "
                      "eval.foreground_gate, off as in SPEC §6). Recommended for new classes.")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from popnet_tf import export_lib  # after flag parsing: keeps --help fast

    f = flags.FLAGS
    try:
        path = export_lib.export_saved_model(
            f.workdir, f.out, version=f.version, stage=int(f.stage) if f.stage else None,
            mask_values=f.mask_values, head=f.head, foreground_gate=f.foreground_gate)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {_one_line(e)}") from None
    logging.info("SavedModel written: %s", path)
    print(path)


def _one_line(error: Exception) -> str:
    """Our errors carry their own message; a system OSError ("[Errno 17] File exists: 'x'")
    reads "x: File exists"."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


if __name__ == "__main__":
    _define_flags()
    logging.set_verbosity(logging.INFO)
    from popnet_tf import cli
    app.run(main, flags_parser=cli.parse_flags)
