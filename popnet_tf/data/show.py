"""Look at episodes: a PNG grid of (support + mask overlay | query | query mask).

Training splits (q_train, s_train) show training episodes (augmented, fold
masked; each pairs a q_train query with an s_train support); test splits
(q_test, s_test) show test pairs. Masks are coloured with `PALETTE` (index =
label in the stage's label space) and a legend names the classes.

Example:
    $ python -m popnet_tf.data.show --data tfrecords/synthetic --split q_train \\
          --stage 3 --fold 1 --out grid.png --num 4 --seed 0 --way kway

    >>> from popnet_tf.data import show
    >>> panel = show.episode_panel(episode, stage=3)   # [S, 3S, 3] uint8
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from popnet_tf import classes, cli

# One colour per label index (stage 3: the 12 merged classes; stages 1 and 2
# use the first 2 / 5 entries). Background is black.
PALETTE = np.array([
    (0, 0, 0),        # 0 background
    (128, 0, 0),      # 1 hat / head / human
    (255, 0, 0),      # 2 hair / body
    (255, 170, 0),    # 3 upper-clothes / arms
    (0, 85, 255),     # 4 skirt / legs
    (0, 128, 0),      # 5 pants
    (170, 0, 255),    # 6 dress
    (85, 51, 0),      # 7 shoes
    (255, 204, 153),  # 8 face
    (0, 204, 204),    # 9 legs
    (255, 255, 0),    # 10 arms
    (0, 255, 85),     # 11 bag
], np.uint8)
IGNORE_COLOUR = np.array((255, 255, 255), np.uint8)   # label 255: ignore and padding
OVERLAY_ALPHA = 0.5
_TEXT = (255, 255, 255)
_CAPTION_HEIGHT = 16


def colourise(mask) -> np.ndarray:
    """[H, W] labels -> [H, W, 3] uint8 colours (255 -> IGNORE_COLOUR)."""
    mask = np.asarray(mask).astype(np.int64)
    out = PALETTE[np.clip(mask, 0, len(PALETTE) - 1)]
    out[mask == classes.IGNORE_LABEL] = IGNORE_COLOUR
    return out


def overlay(image, mask, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blends the mask's colours into the image on foreground pixels (not 0, not 255)."""
    image = np.clip(np.asarray(image, np.float32), 0, 255)
    mask = np.asarray(mask)
    fg = ((mask != 0) & (mask != classes.IGNORE_LABEL))[..., None]
    blended = (1 - alpha) * image + alpha * colourise(mask).astype(np.float32)
    return np.where(fg, blended, image).round().astype(np.uint8)


def _label_in_frame(label, valid_size, size: int) -> np.ndarray:
    """A full-resolution label resized (nearest) into the padded size x size frame."""
    label = np.asarray(label)
    rows, cols = (int(v) for v in valid_size)
    r = np.minimum(((np.arange(rows) + 0.5) * label.shape[0] / rows).astype(int), label.shape[0] - 1)
    c = np.minimum(((np.arange(cols) + 0.5) * label.shape[1] / cols).astype(int), label.shape[1] - 1)
    frame = np.full((size, size), classes.IGNORE_LABEL, label.dtype)
    frame[:rows, :cols] = label[r][:, c]
    return frame


def episode_panel(episode: dict, stage: int) -> np.ndarray:
    """One row of tiles for an episode: support image with its mask overlaid |
    query image | query mask [| prediction].

    Accepts a train or test episode of `popnet_tf.data.episodes` (query_image,
    support_image, query_mask, support_mask) or an evaluation example
    ("truth" / "prediction" at label resolution with "valid_size"; they are
    resized into the query's frame). Returns [S, n*S, 3] uint8.

    Example:
        >>> panel = episode_panel({k: v[0] for k, v in batch.items()}, stage=3)
    """
    del stage  # the palette is indexed by label; kept for a uniform call
    query = np.asarray(episode["query_image"])
    size = query.shape[0]
    if "query_mask" in episode:
        truth = np.asarray(episode["query_mask"])
    else:
        truth = _label_in_frame(episode["truth"], episode["valid_size"], size)
    tiles = [overlay(episode["support_image"], episode["support_mask"]),
             np.clip(query, 0, 255).round().astype(np.uint8), colourise(truth)]
    if "prediction" in episode:
        prediction = np.asarray(episode["prediction"])
        if prediction.shape != (size, size):
            prediction = _label_in_frame(prediction, episode["valid_size"], size)
        tiles.append(colourise(prediction))
    return np.concatenate(tiles, axis=1)


def _font():
    return ImageFont.load_default()


def render_grid(episodes: list[dict], stage: int, captions: list[str] | None = None) -> Image.Image:
    """Stacks `episode_panel` rows under column titles, with a caption per row
    and a legend of the stage's classes. Returns a PIL RGB image.

    Example:
        >>> render_grid([episode], stage=2).save("grid.png")
    """
    if not episodes:
        raise ValueError("render_grid: no episodes to draw")
    panels = [episode_panel(e, stage) for e in episodes]
    width = max(p.shape[1] for p in panels)
    tile = panels[0].shape[0]
    titles = ["support + mask", "query", "query mask", "prediction"][:width // tile]
    names = classes.STAGE_CLASS_NAMES[stage]
    font = _font()
    swatch, legend_cols = 12, max(1, width // 150)
    legend_rows = -(-(len(names) + 1) // legend_cols)
    legend_height = legend_rows * (swatch + 6) + 8
    row_height = tile + _CAPTION_HEIGHT
    height = _CAPTION_HEIGHT + len(panels) * row_height + legend_height
    canvas = Image.new("RGB", (width, height), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        draw.text((i * tile + 4, 2), title, fill=_TEXT, font=font)
    for r, panel in enumerate(panels):
        top = _CAPTION_HEIGHT + r * row_height
        if captions:
            draw.text((4, top + 2), captions[r], fill=_TEXT, font=font)
        canvas.paste(Image.fromarray(panel), (0, top + _CAPTION_HEIGHT))
    entries = [(i, name, PALETTE[i]) for i, name in enumerate(names)]
    entries.append((classes.IGNORE_LABEL, "ignore / pad", IGNORE_COLOUR))
    top = _CAPTION_HEIGHT + len(panels) * row_height + 4
    for k, (label, name, colour) in enumerate(entries):
        x = (k % legend_cols) * (width // legend_cols) + 4
        y = top + (k // legend_cols) * (swatch + 6)
        draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(v) for v in colour), outline=_TEXT)
        draw.text((x + swatch + 4, y), f"{label} {name}", fill=_TEXT, font=font)
    return canvas


def _numpy(example: dict) -> dict:
    return {k: v.numpy() for k, v in example.items()}


def load_episodes(data_dir: str, *, split: str, stage: int, fold: int, fold_set: str, way: str,
                  num: int, seed: int, crop_size: int, eval_size: int,
                  resize_long_side: int | None) -> tuple[list[dict], list[str]]:
    """`num` episodes to show, with a caption each: training episodes for the
    training splits, test pairs (spread over queries and supports) for the test ones."""
    from popnet_tf.data import episodes as ep

    names = classes.STAGE_CLASS_NAMES[stage]
    if split in ("q_train", "s_train"):
        ds = ep.train_episodes(data_dir, stage=stage, fold=fold, fold_set=fold_set, way=way,
                               batch_size=1, crop_size=crop_size, resize_long_side=resize_long_side,
                               seed=seed)
        out = [{k: v[0] for k, v in _numpy(b).items()} for b in ds.take(num)]
        captions = [f"train {way}, fold {fold}" + (f", class {names[e['class_id']]}" if e["class_id"] >= 0 else "")
                    for e in out]
        return out, captions
    if split not in ("q_test", "s_test"):
        raise ValueError(f"--split must be one of q_train, s_train, q_test, s_test; got {split!r}")
    if way == "kway":
        # Pair i*11: query i with support i mod 10, so rows differ in both.
        ds = ep.test_episodes(data_dir, stage=stage, fold=fold, fold_set=fold_set, way=way,
                              eval_size=eval_size, seed=seed).shard(11, 0)
    else:
        ds = ep.test_episodes(data_dir, stage=stage, fold=fold, fold_set=fold_set, way=way,
                              eval_size=eval_size, pairs_per_class=1, seed=seed)
    out = [_numpy(e) for e in ds.take(num)]
    captions = [f"test: query {e['query_id'].decode()} / support {e['support_id'].decode()}"
                + (f", class {names[e['class_id']]}" if e["class_id"] >= 0 else "") for e in out]
    return out, captions


def _define_flags():
    from absl import flags

    flags.DEFINE_string("data", None, "Built ATR-OS dataset folder.", required=True)
    flags.DEFINE_enum("split", "q_train", ["q_train", "s_train", "q_test", "s_test"],
                      "Training splits show training episodes, test splits test pairs.")
    flags.DEFINE_integer("stage", 3, "Label space: 1 (human), 2 (main body areas) or 3 "
                         "(the 12 merged classes).")
    flags.DEFINE_integer("fold", 1, "Fold, 1 or 2 (training splits: its novel "
                         "classes are hidden).")
    flags.DEFINE_string("fold_set", classes.DEFAULT_FOLD_SET, "Fold definitions: paper or journal.")
    flags.DEFINE_enum("way", "kway", ["kway", "oneway"], "k-way or one-way episodes.")
    flags.DEFINE_integer("num", 4, "Episodes (rows) to draw.")
    flags.DEFINE_integer("seed", 0, "Episode seed.")
    flags.DEFINE_integer("crop_size", 512, "Training splits: crop side in pixels "
                         "(paper: 512 k-way, 576 one-way).")
    flags.DEFINE_integer("eval_size", 512, "Test splits: side in pixels of the square frame "
                         "each image is resized (aspect kept) and padded to.")
    flags.DEFINE_integer("resize_long_side", 0, "Training splits: resize the long "
                         "side to this many pixels before cropping (0: none).")
    flags.DEFINE_string("out", "episodes.png", "Output PNG file.")
    return flags.FLAGS


def check_flags(f) -> None:
    """The flag values, before any data is read: one ValueError naming the flag. A zero
    --eval_size ended in a tf.data traceback, a negative --resize_long_side was taken for
    "no resize" silently, and a folder at --out gave "unknown file extension"."""
    import os

    if f.stage not in (1, 2, 3):
        raise ValueError(f"--stage must be 1, 2 or 3, got {f.stage}")
    if f.num < 1:
        raise ValueError(f"--num must be at least 1, got {f.num}")
    if f.eval_size < 1:
        raise ValueError(f"--eval_size must be at least 1, got {f.eval_size}")
    if f.resize_long_side < 0:
        raise ValueError(f"--resize_long_side must be >= 0 (0: none), got {f.resize_long_side}")
    if os.path.isdir(f.out):
        raise ValueError(f"--out={f.out} is a folder; give a PNG file name")
    from PIL import Image

    extension = os.path.splitext(f.out)[1].lower()
    if extension not in Image.registered_extensions():  # else Pillow's message, after the work
        raise ValueError(f"--out={f.out}: {extension or 'no extension'} is not an image "
                         "format Pillow writes; give a .png file name")


def main(argv):
    from absl import app, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = FLAGS
    try:
        # Mistakes of the user (no dataset at --data, a raw ATR folder there, a stage or
        # fold that does not exist, --out in a missing folder): one line, no traceback.
        check_flags(f)
        rows, captions = load_episodes(
            f.data, split=f.split, stage=f.stage, fold=f.fold, fold_set=f.fold_set, way=f.way,
            num=f.num, seed=f.seed, crop_size=f.crop_size, eval_size=f.eval_size,
            resize_long_side=f.resize_long_side or None)
        render_grid(rows, f.stage, captions).save(f.out)
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        raise SystemExit(f"FATAL {type(e).__name__}: {e}") from None
    logging.info("wrote %d episodes to %s", len(rows), f.out)


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
