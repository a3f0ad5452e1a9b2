"""Parse your own photos with classes defined by your own reference image.

One support image and its mask (any values 1-254 for your classes, 0
background, 255 ignore) define the classes; every query image (files, or
folders of images; folders inside those are listed as skipped, not searched)
gets, in --out:
    <name>.png          label map at the query's size, palette PNG whose pixel
                        values are your mask's values
    <name>_overlay.jpg  the query with the classes' colours blended in
    summary.json        per query and in total: pixels and area fraction of each
                        class found, plus the queries that failed and why

--model is an exported SavedModel (a `popnet_tf.export` folder, its latest
version is used, or one version folder) or a training workdir; both run the
same `popnet_tf.serving` function that TF Serving runs, so local and served
predictions agree.

Usage:
    python -m popnet_tf.predict --model exported/popnet --support ref.jpg \\
        --support_mask ref.png --query photos/ extra.jpg --out parsed/ \\
        [--class_names '{"1": "jacket", "7": "sneaker"}']

Photos are read as a viewer shows them: turned upright by their EXIF
orientation tag (phones store most photos sideways with such a tag), so label
maps and overlays line up with the photo as you see it (--noapply_exif parses
the stored pixels instead). JPEG, PNG, GIF, BMP and WebP are decoded by the
model's own decoder; other formats Pillow reads (TIFF, AVIF, JPEG 2000, PNM,
TGA, ...) are decoded here and sent to the model as PNG.

Bad input gets one line naming the file: a support problem (unreadable image,
mask size different from the image, no foreground, too many classes) stops
before any work; an unreadable, damaged or non-image query is skipped, the
others are still parsed and the failures listed at the end (exit status 1).

The work is done by `popnet_tf.predict_lib` (this module is the command line only;
TensorFlow is imported after the flags are parsed, so --help is instant).

Example (library):
    >>> from popnet_tf import predict_lib
    >>> predictor = predict_lib.load_predictor("exported/popnet")
    >>> support = predict_lib.read_support("ref.jpg", "ref.png", predictor)
    >>> summary = predict_lib.predict_files(predictor, support, ["photos/"], "parsed/")
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from popnet_tf import cli

# serving.MASK_VALUES and serving.HEADS (not imported here: serving imports TensorFlow).
MASK_VALUES = ["user", "merged"]
HEADS = ["ncm", "agm", "mean"]


# ----------------------------------------------------------------------------- CLI
def _define_flags():
    """The CLI's flags (defined on demand, so importing the library defines none)."""
    flags.DEFINE_string("model", None, "Exported SavedModel folder (or one version) or a "
                        "training workdir.")
    flags.DEFINE_string("support", None, "Support (reference) image.")
    flags.DEFINE_string("support_mask", None, "Support mask PNG: your class values 1..254 as "
                        "pixels, 0 background, 255 ignore.")
    flags.DEFINE_multi_string("query", None, "Query image file or folder (its image files; "
                              "folders inside it are listed as skipped); repeat the flag or "
                              "list several after it.")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_string("class_names", None, "JSON file or text naming the mask values: "
                        "{\"7\": \"sneaker\"} or a list.")
    flags.DEFINE_enum("mask_values", None, MASK_VALUES,
                      "Workdir only: 'user' (default) or 'merged' (ATR-OS merged ids 0-11; "
                      "for a workdir whose last stage is 2, its area ids 0-4).")
    flags.DEFINE_enum("head", None, HEADS, "Workdir only: the prediction head: ncm (nearest "
                      "centroid, SPEC §6), agm (attention guidance) or mean (the mean of both "
                      "heads' probabilities) (default: the config's eval.head, ncm); a "
                      "SavedModel has it fixed at export.")
    flags.DEFINE_bool("foreground_gate", None, "Workdir only: gate the head by stage 1's human "
                      "probability, so that background cannot take a class (default: the "
                      "config's eval.foreground_gate); a SavedModel has it fixed at export.")
    flags.DEFINE_integer("batch_size", 4, "Queries per model call, at most: a call holds "
                         "consecutive queries of one size, 16 megapixels in all (larger photos "
                         "go one by one), so that memory stays bounded.")
    flags.DEFINE_bool("apply_exif", True, "Turn photos upright by their EXIF orientation tag "
                      "before parsing, as viewers show them; labels and overlays are then "
                      "upright too. --noapply_exif parses the stored pixels (then a support "
                      "mask must match the stored pixels).")


def main(argv):
    from popnet_tf.predict_lib import (SUMMARY_FILE, InputError, format_summary, load_predictor,
                                       make_output_folder, predict_files, read_class_names,
                                       read_support)

    f = flags.FLAGS
    # Paths after --query's first value arrive as positional arguments: more queries.
    queries = list(f.query or []) + list(argv[1:])
    missing = [f"--{n}" for n in ("model", "support", "support_mask", "out") if not f[n].value]
    if missing or not queries:
        raise app.UsageError(f"missing {', '.join(missing + ([] if queries else ['--query']))}")
    try:
        predictor = load_predictor(f.model, f.mask_values, f.head, f.foreground_gate)
        support = read_support(f.support, f.support_mask, predictor, f.apply_exif)
        names = read_class_names(f.class_names, predictor.class_names)
        make_output_folder(f.out)
    except (InputError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    summary = predict_files(predictor, support, queries, f.out, class_names=names,
                            batch_size=f.batch_size, apply_exif=f.apply_exif)
    logging.info("Parsed %d image(s) with %s into %s (summary: %s)", len(summary["queries"]),
                 predictor.source, f.out, os.path.join(f.out, SUMMARY_FILE))
    write_text(format_summary(summary) + "\n")
    return 1 if summary["failures"] else 0


def write_text(text: str, stream=None):
    """Writes text that may hold file names which are not valid in the stream's encoding
    (bytes that are not UTF-8 arrive as surrogates): as the bytes of the name where the
    stream takes bytes, else with backslash escapes, never an UnicodeEncodeError."""
    stream = stream or sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        buffer = getattr(stream, "buffer", None)
        try:
            data = text.encode(encoding, "surrogateescape")
        except UnicodeEncodeError:
            data = text.encode(encoding, "backslashreplace")
        if buffer is not None:
            stream.flush()
            buffer.write(data)
            buffer.flush()
            return
        text = data.decode(encoding, "backslashreplace")
    stream.write(text)


if __name__ == "__main__":
    _define_flags()
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=cli.parse_flags)
