"""Serving: one-shot parsing of a user's own photos, as exported to TF Serving.

Everything a served request does happens inside the functions of this module,
so a client sends what it has (JPEG/PNG bytes or image tensors) and gets label
maps back at its images' own size. Training code is never imported here; only
the model object and the evaluation geometry of `data.augment` are used.

A request holds one support (image + mask) and N queries:

1. **Classes.** The support mask's own values are the classes: 0 is background,
   255 ignore, and every other value present (1-254) is one class. The n
   values are sorted and given the model's class slots 1..n (n must be at most
   `num_classes - 1`); the outputs map each slot back to its value, so a mask
   that labels a new garment 7 gets 7 in the label map (the one-shot promise).
   A user's classes are new to the model, so their prototypes are the support's
   static ones (Eq. 1); the dynamic store (Eq. 2) holds prototypes of the
   *training* classes and is only meaningful when a value means a training
   class. `mask_values="merged"` is that case: the mask holds ATR-OS merged ids
   0-11, each value is its own slot, and base classes use the store as in
   evaluation (SPEC §6).
2. **Support, once.** The support is resized (aspect kept) and padded to the
   model's `eval_size` exactly as in evaluation (`augment.eval_resize`); its
   features and prototypes are computed once for all the request's queries.
3. **Queries, batched.** Each query is resized and padded the same way, the N
   queries (and the support) go through the encoder as one batch, the prediction head's
   probabilities are cropped to the unpadded region and resized bilinearly to
   the query's original size, and the argmax gives the label map.

Outputs (dict):
    labels         [N, H, W] int32: the support's class values (0 = background);
                   in a batch of queries of different sizes H, W are the largest
                   height and width and a query's pixels beyond its own size are
                   255 (see `image_sizes`).
    probabilities  [N, H, W, S] float32: probability of each of `class_values`
                   (0 beyond a query's own size).
    class_values   [S] int32: 0 followed by the support's class values, sorted;
                   `probabilities[..., i]` is the probability of `class_values[i]`.
    image_sizes    [N, 2] int32: each query's (height, width).

Bad requests fail with `InvalidArgument` and a message naming the input: a
support mask with no foreground, with more classes than the model has slots,
a size different from the support image's, a non-PNG or non-8-bit-grayscale
mask (a palette PNG's indices are not readable by TensorFlow's decoder), and,
with `mask_values="merged"`, a value outside 0-11.

Example:
    >>> parser = OneShotParser(stage3_model, eval_size=608)
    >>> fn = parser.function(SIGNATURE_ENCODED)
    >>> out = fn(query_images=tf.constant([open("q.jpg", "rb").read()]),
    ...          support_image=tf.constant(open("s.jpg", "rb").read()),
    ...          support_mask=tf.constant(open("s.png", "rb").read()))
    >>> out["labels"].shape, out["class_values"]
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from popnet_tf import classes
from popnet_tf.data import augment

SIGNATURE_ENCODED = "serving_default"   # JPEG/PNG bytes: what a REST client sends as b64
SIGNATURE_IMAGES = "parse_images"        # decoded image tensors
SIGNATURES = (SIGNATURE_ENCODED, SIGNATURE_IMAGES)
INPUT_NAMES = ("query_images", "support_image", "support_mask")
OUTPUT_NAMES = ("labels", "probabilities", "class_values", "image_sizes")
MASK_VALUES = ("user", "merged")
HEADS = ("ncm", "agm", "mean")
BACKGROUND = 0
IGNORE = classes.IGNORE_LABEL   # ignore in a support mask; padding in `labels`
NUM_VALUES = 256                # mask values are 8-bit
# Beside an exported SavedModel: what was exported and how (TF Serving ignores assets.extra).
METADATA_PATH = os.path.join("assets.extra", "popnet_export.json")

# PNG file layout: 8-byte signature, then the IHDR chunk whose data starts at byte
# 16 (width, height, bit depth at 24, colour type at 25).
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GRAYSCALE = 0


def input_signature(name: str) -> list[tf.TensorSpec]:
    """The `tf.TensorSpec`s of a signature's inputs, in `INPUT_NAMES` order.

    Example:
        >>> input_signature(SIGNATURE_IMAGES)[0].shape  # TensorShape([None, None, None, 3])
    """
    if name == SIGNATURE_ENCODED:
        specs = [([None], tf.string), ([], tf.string), ([], tf.string)]
    elif name == SIGNATURE_IMAGES:
        specs = [([None, None, None, 3], tf.float32), ([None, None, 3], tf.float32),
                 ([None, None], tf.int32)]
    else:
        raise ValueError(f"unknown signature {name!r}; known: {SIGNATURES}")
    return [tf.TensorSpec(shape, dtype, name=n) for (shape, dtype), n in zip(specs, INPUT_NAMES)]


def read_metadata(version_dir: str) -> dict:
    """The export record of a SavedModel version folder ({} when it has none).

    Example:
        >>> read_metadata("exported/popnet/1")["mask_values"]   # 'user'
    """
    path = os.path.join(version_dir, METADATA_PATH)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- decoding
_DECODED_FORMATS = "JPEG, PNG, GIF, BMP or WebP"
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def decode_image(data, name="image") -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> [H, W, 3] uint8 (first frame of a GIF;
    grayscale and alpha images converted to RGB).

    `name` (a string or scalar string tensor) is what the errors call the input, so that a
    client learns which one failed: "support_image", "query_images[3]".
    """
    data = tf.convert_to_tensor(data, tf.string)
    head = tf.strings.substr(data, 0, 30)  # fewer bytes when the input is shorter
    padded = head + b"\0" * 30
    is_webp = tf.logical_and(tf.equal(tf.strings.substr(padded, 0, 4), b"RIFF"),
                             tf.equal(tf.strings.substr(padded, 8, 4), b"WEBP"))
    known = tf.reduce_any(tf.stack([tf.equal(tf.strings.substr(head, 0, len(signature)), signature)
                                    for signature in _IMAGE_SIGNATURES] + [is_webp]))
    problem = tf.where(tf.equal(tf.strings.length(data), 0), " is empty",
                       f" is not a {_DECODED_FORMATS} file")
    check_format = tf.debugging.Assert(known, [tf.strings.join(
        [name, problem, " (the formats decoded here; convert other images, e.g. to PNG)"])])
    # TensorFlow's BMP decoder reads an 8-bit palette BMP's indices as grey levels (a
    # silently wrong photo) and refuses 1-, 4- and 16-bit ones with a bare channel count.
    header = tf.io.decode_raw(tf.strings.substr(padded, 0, 30), tf.uint8)  # [30]
    is_bmp = tf.equal(tf.strings.substr(head, 0, 2), b"BM")
    bits = tf.cast(header[28], tf.int32) + 256 * tf.cast(header[29], tf.int32)
    check_bmp = tf.debugging.Assert(
        tf.logical_or(tf.logical_not(is_bmp), tf.logical_or(tf.equal(bits, 24), tf.equal(bits, 32))),
        [tf.strings.join([name, ": a BMP image must have 24 or 32 bits per pixel (its palette "
                          "or packed pixels are not decoded right); got ", tf.strings.as_string(bits),
                          " bits: send it as PNG"])])
    with tf.control_dependencies([check_format, check_bmp]):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode_mask_png(data) -> tf.Tensor:
    """An 8-bit single-channel (grayscale) PNG -> [H, W] int32 of its pixel values.

    TensorFlow's PNG decoder turns a palette PNG into colours and an RGB one into
    luminance, which would silently change the class values; such masks, and
    anything not a PNG, are refused with a message saying what to send instead.
    """
    data = tf.convert_to_tensor(data, tf.string)
    header = tf.strings.substr(data, 0, 26)  # fewer bytes when the file is shorter
    fields = tf.io.decode_raw(tf.strings.substr(header + b"\0" * 26, 0, 26), tf.uint8)  # [26]
    is_png = tf.equal(tf.strings.substr(header, 0, 8), _PNG_SIGNATURE)
    check_png = tf.debugging.Assert(
        is_png, ["support_mask is not a PNG file: send the mask as a PNG (lossless) whose "
                 "pixel values are the class values"])
    with tf.control_dependencies([check_png]):
        bit_depth, colour_type = fields[24], fields[25]
    check_gray = tf.debugging.Assert(
        tf.logical_and(tf.equal(bit_depth, 8), tf.equal(colour_type, _PNG_GRAYSCALE)),
        ["support_mask must be an 8-bit single-channel (grayscale) PNG whose pixel values are "
         "the class values; got PNG bit depth", bit_depth, "colour type", colour_type,
         "(3 = palette: convert it, e.g. PIL Image.fromarray(np.array(Image.open(p)), 'L'))"])
    with tf.control_dependencies([check_gray]):
        mask = tf.io.decode_png(data, channels=1, dtype=tf.uint8)
    return tf.cast(mask[..., 0], tf.int32)


# ----------------------------------------------------------------------------- geometry
def fit_and_pad(images, eval_size: int):
    """Aspect-preserving bilinear resize to fit eval_size x eval_size, padded
    bottom/right with 0: the image half of `augment.eval_resize`, for one image
    [H, W, 3] or a batch [N, H, W, 3] of one size.

    Returns:
        (padded [..., E, E, 3] float32, valid_size [2] int32: rows, cols of the
        unpadded region).
    """
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    rank = images.shape.rank
    new_h, new_w = augment.eval_size_of(shape[rank - 3], shape[rank - 2], eval_size)
    resized = augment.resize_image(images, tf.stack([new_h, new_w]))
    pad = [[0, 0]] * (rank - 3) + [[0, eval_size - new_h], [0, eval_size - new_w], [0, 0]]
    padded = tf.pad(resized, pad, constant_values=augment.IMAGE_PAD)
    padded = tf.ensure_shape(padded, [None] * (rank - 3) + [eval_size, eval_size, 3])
    return padded, tf.stack([new_h, new_w])


def restore_size(probs, valid_sizes, image_sizes):
    """[N, E, E, S] probabilities in the padded frame -> [N, H, W, S] at each query's
    own size: crop the unpadded region, bilinear resize (as evaluation does, SPEC §8),
    pad to the largest H, W of the batch with probability 0."""
    max_size = tf.reduce_max(image_sizes, axis=0)  # [2]

    def one(args):
        p, valid, size = args
        p = tf.image.resize(p[: valid[0], : valid[1]], size, method="bilinear")
        return tf.pad(p, [[0, max_size[0] - size[0]], [0, max_size[1] - size[1]], [0, 0]])

    return tf.map_fn(one, (probs, valid_sizes, image_sizes),
                     fn_output_signature=tf.TensorSpec([None, None, None], tf.float32))


# ----------------------------------------------------------------------------- classes
def class_mapping(mask, num_classes: int, mask_values: str = "user"):
    """The support mask's classes and the model slots they take.

    Args:
        mask: [H, W] int32 support mask (0 background, 255 ignore).
        num_classes: the model's classes, background included (C).
        mask_values: "user" (any values 1-254, mapped to slots 1..n in sorted order)
            or "merged" (ATR-OS merged ids 0-11, each its own slot).
    Returns:
        slot_mask [H, W] int32 (values in slot space, 255 kept), class_values [S]
        int32 and slots [S] int32, S = n + 1, both starting with background 0.

    Example:
        >>> slot_mask, values, slots = class_mapping(tf.constant([[0, 7], [200, 255]]), 12)
        >>> slot_mask.numpy().tolist(), values.numpy().tolist(), slots.numpy().tolist()
        ([[0, 1], [2, 255]], [0, 7, 200], [0, 1, 2])
    """
    if mask_values not in MASK_VALUES:
        raise ValueError(f"mask_values must be one of {MASK_VALUES}, got {mask_values!r}")
    mask = tf.cast(mask, tf.int32)
    in_range = tf.debugging.Assert(
        (tf.reduce_min(mask) >= 0) & (tf.reduce_max(mask) < NUM_VALUES),
        ["support_mask values must lie in 0..255 (0 background, 255 ignore); got min",
         tf.reduce_min(mask), "max", tf.reduce_max(mask)])
    with tf.control_dependencies([in_range]):
        counts = tf.math.bincount(tf.reshape(mask, [-1]), minlength=NUM_VALUES,
                                  maxlength=NUM_VALUES)  # [256]
    values = tf.range(NUM_VALUES)
    present = (counts > 0) & (values != BACKGROUND) & (values != IGNORE)  # [256]
    found = tf.boolean_mask(values, present)  # [n], sorted
    n = tf.size(found)
    checks = [tf.debugging.assert_greater(
        n, 0, message="support_mask has no foreground: label at least one class with a "
                      "value in 1..254 (0 is background, 255 ignore)")]
    if mask_values == "user":
        checks.append(tf.debugging.assert_less_equal(
            n, num_classes - 1,
            message=f"support_mask holds more classes than the {num_classes - 1} the model has "
                    f"(values other than 0 and 255 each count as one class); merge some"))
        slots_of_found = tf.range(1, n + 1)
    else:
        checks.append(tf.debugging.assert_less(
            tf.reduce_max(tf.where(present, values, 0)), num_classes,
            message=f"support_mask holds a value outside the merged ATR-OS ids 0..{num_classes - 1} "
                    "(and 255); export with --mask_values=user for masks with your own values"))
        slots_of_found = found
    with tf.control_dependencies(checks):
        table = tf.tensor_scatter_nd_update(values, found[:, None], slots_of_found)  # [256]
        slot_mask = tf.gather(table, mask)
    class_values = tf.concat([[BACKGROUND], found], axis=0)
    slots = tf.concat([[BACKGROUND], slots_of_found], axis=0)
    return slot_mask, class_values, slots


# How far outside 0..255 pixels may lie: bicubic or Lanczos resampling of a 0..255 image
# overshoots at sharp edges (Lanczos-5 by 38 levels on alternating black and white
# columns), which is harmless to the model. Mean-subtracted inputs reach about -124.
PIXEL_SLACK = 64.0


def check_pixels(images, name: str) -> tf.Operation:
    """An op that fails (InvalidArgument, naming the image) unless `images` hold 0..255 pixels.

    Decoded tensors sent to `parse_images` must be RGB values in 0..255. Three mistakes
    are caught, image by image, each of which would otherwise give wrong labels silently:
    values that are not finite; values far outside 0..255 (16-bit data, mean-subtracted
    inputs; up to `PIXEL_SLACK` outside is let through, as resampling overshoots); and
    normalised images (0..1, -1..1 or standardised: fractional values, all at most 1, or
    negative ones and none above 4, which only a black 0..255 image could show). Channel
    order (BGR) cannot be told from the values and is not checked.

    Args:
        images: [N, H, W, 3] (named `name[i]` in messages) or one [H, W, 3] image.
        name: the input's name, for the messages.

    Example:
        >>> check_pixels(tf.constant([[[[0.2, 0.5, 1.0]]]]), "query_images")
        Traceback (most recent call last):
        InvalidArgumentError: ... query_images[0] looks normalised (0..1, -1..1 or standardised ...
    """
    images = tf.convert_to_tensor(images, tf.float32)
    single = images.shape.rank == 3
    batch = images[None] if single else images                      # [N, H, W, C]
    axes = [1, 2, 3]
    low = tf.reduce_min(batch, axis=axes)        # [N]; +inf for an image without pixels
    high = tf.reduce_max(batch, axis=axes)
    finite = tf.reduce_all(tf.math.is_finite(batch), axis=axes)
    in_range = ~finite | ((low >= -PIXEL_SLACK) & (high <= 255.0 + PIXEL_SLACK))
    fractional = tf.reduce_any(tf.not_equal(batch, tf.round(batch)), axis=axes)
    normalised = finite & fractional & ((high <= 1.0) | ((low < 0.0) & (high <= 4.0)))

    def assert_none(bad, problem):
        """Fails naming the first image for which `bad` holds, and its min and max."""
        # A sentinel entry keeps argmax and gather defined for an empty batch.
        first = tf.argmax(tf.concat([tf.cast(bad, tf.int32), [1]], 0))   # N when none is bad
        label = name if single else tf.strings.join([name, "[", tf.strings.as_string(first), "]"])
        return tf.debugging.Assert(~tf.reduce_any(bad), [
            label, problem, "min", tf.concat([low, [0.0]], 0)[first],
            "max", tf.concat([high, [0.0]], 0)[first]])

    return tf.group(
        assert_none(~finite, "holds NaN or infinite values;"),
        assert_none(~in_range, "must hold RGB pixel values in 0..255; got"),
        assert_none(normalised, "looks normalised (0..1, -1..1 or standardised); send RGB "
                                "pixel values in 0..255;"))


# ----------------------------------------------------------------------------- the parser
class OneShotParser:
    """One-shot parsing of queries with classes defined by one support (see module doc).

    Args:
        model: a trained `OneShotStage` (stage 3, or 2), its earlier stages inside; a
            baseline of `models.baselines` is refused (ValueError).
        eval_size: E, the square input size the model is evaluated at
            (config.data.eval_size).
        mask_values: "user" (default) or "merged", see `class_mapping`.
        head: "ncm" (SPEC §6 default), "agm" or "mean": whose probabilities are served.
        foreground_gate: gate them by stage 1's human probability
            (`stages.gate_by_foreground`), so that background cannot take a class.

    Example:
        >>> parser = OneShotParser(model, eval_size=608)
        >>> out = parser.parse_images(queries_f32, support_f32, support_mask_i32)
        >>> fn = parser.function(SIGNATURE_ENCODED)   # a tf.function with its input signature
    """

    def __init__(self, model, eval_size: int, mask_values: str = "user", head: str = "ncm",
                 foreground_gate: bool = False):
        method = getattr(model, "method", "")
        if method:  # models.baselines: no prototype store, NCM or AGM; Fine-tune tunes per support
            raise ValueError(f"the {method} baseline cannot be exported or served (only POPNet's "
                             "one-shot stages can); score it with popnet_tf.evaluate")
        if mask_values not in MASK_VALUES:
            raise ValueError(f"mask_values must be one of {MASK_VALUES}, got {mask_values!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.model = model
        self.eval_size = int(eval_size)
        self.mask_values = mask_values
        self.head = head
        if foreground_gate and not hasattr(model, "foreground_gated"):
            raise ValueError(f"foreground_gate needs a POPNet stage with stage 1 inside, "
                             f"not a {type(model).__name__}")
        if foreground_gate:
            model.foreground_stage()  # raises for a stage without previous stages (KIM off)
        self.foreground_gate = bool(foreground_gate)
        self.num_classes = int(model.num_classes)
        self._functions = {}
        e = self.eval_size
        self._score_fn = tf.function(self._score, autograph=False, input_signature=[
            tf.TensorSpec([None, e, e, 3], tf.float32), tf.TensorSpec([e, e, 3], tf.float32),
            tf.TensorSpec([e, e], tf.int32)])

    # --- the two signatures
    def parse_encoded(self, query_images, support_image, support_mask):
        """query_images [N] string, support_image [] string, support_mask [] string
        (8-bit grayscale PNG) -> outputs dict (module doc)."""
        image = decode_image(support_image, "support_image")
        mask = decode_mask_png(support_mask)

        def prepare(args):
            data, index = args
            query = decode_image(data, tf.strings.join(["query_images[", tf.strings.as_string(index), "]"]))
            padded, valid = fit_and_pad(query, self.eval_size)
            return padded, valid, tf.shape(query)[:2]

        check = self._check_queries(query_images)
        with tf.control_dependencies([check]):
            queries, valid, sizes = tf.map_fn(
                prepare, (query_images, tf.range(tf.shape(query_images)[0])), fn_output_signature=(
                    tf.TensorSpec([self.eval_size, self.eval_size, 3], tf.float32),
                    tf.TensorSpec([2], tf.int32), tf.TensorSpec([2], tf.int32)))
        return self._parse(queries, valid, sizes, image, mask)

    def parse_images(self, query_images, support_image, support_mask):
        """query_images [N, H, W, 3] float (0..255), support_image [H', W', 3] float
        (0..255), support_mask [H', W'] int -> outputs dict (module doc)."""
        checks = [self._check_queries(query_images), check_pixels(query_images, "query_images"),
                  check_pixels(support_image, "support_image")]
        with tf.control_dependencies(checks):
            queries, valid = fit_and_pad(query_images, self.eval_size)
            support_image = tf.identity(support_image)
        n = tf.shape(query_images)[0]
        valid = tf.tile(valid[None], [n, 1])
        sizes = tf.tile(tf.shape(query_images)[1:3][None], [n, 1])
        return self._parse(queries, valid, sizes, support_image, tf.cast(support_mask, tf.int32))

    def function(self, name: str):
        """The signature `name` as a `tf.function` with its input signature (traced once)."""
        if name not in self._functions:
            fn = self.parse_encoded if name == SIGNATURE_ENCODED else self.parse_images
            self._functions[name] = tf.function(fn, input_signature=input_signature(name),
                                                autograph=False)
        return self._functions[name]

    # --- shared path
    @staticmethod
    def _check_queries(query_images):
        return tf.debugging.assert_positive(
            tf.shape(query_images)[0], message="query_images is empty: send at least one query")

    def _score(self, queries, support_image, slot_mask):
        """[N, E, E, 3] queries, one [E, E, 3] support and its [E, E] slot mask -> the
        head's probabilities [N, E, E, C] float32.

        The support rides in the queries' encoder batch (BatchNorm is in inference
        mode, so samples do not interact): its features and prototypes are computed
        once per request, and the model is traced once for both signatures.
        """
        images = tf.concat([support_image[None], queries], axis=0)  # [1 + N, E, E, 3]
        if self.foreground_gate:  # stage 1's human probability from the same pass
            features, human = self.model.features_and_foreground(images)
        else:
            features = self.model.infused_features(images, training=False)  # [1 + N, h, w, K]
        # = model.support_prototypes(support_image[None], slot_mask[None]): Eq. 1.
        static, presence = self.model.pooling(features[:1], slot_mask[None])  # [1, C, K], [1, C]
        # A user's classes are new: static prototypes. Merged ids name training classes,
        # whose dynamic prototypes the store holds (SPEC §6, as in evaluation).
        prototypes = self.model.store(
            static, presence, training=False,
            use_dynamic=self.mask_values == "merged" and getattr(self.model, "dynamic_prototypes", True))
        n = tf.shape(queries)[0]
        out = self.model.heads(features[1:], tf.tile(prototypes, [n, 1, 1]), tf.tile(presence, [n, 1]),
                               queries, compute_agm=self.head != "ncm")
        if self.head == "ncm":
            probs = out["ncm_probs"]
        elif self.head == "agm":
            probs = out["agm_probs"]
        else:
            probs = 0.5 * (out["agm_probs"] + out["ncm_probs"])
        if self.foreground_gate:
            return self.model.gate_by_foreground(probs, human[1:])
        return tf.cast(probs, tf.float32)

    def _parse(self, queries, valid, sizes, support_image, support_mask):
        size_check = tf.debugging.assert_equal(
            tf.shape(support_image)[:2], tf.shape(support_mask),
            message="support_mask must have the height and width of support_image")
        with tf.control_dependencies([size_check]):
            slot_mask, class_values, slots = class_mapping(support_mask, self.num_classes,
                                                           self.mask_values)
        support_image, slot_mask, _ = augment.eval_resize(support_image, slot_mask, self.eval_size)
        probs = self._score_fn(queries, support_image, slot_mask)  # [N, E, E, C]
        # Slots the support does not use have probability 0 (masked logits): keep its own.
        probs = tf.gather(probs, slots, axis=-1)  # [N, E, E, S]
        probabilities = restore_size(probs, valid, sizes)  # [N, H, W, S]
        labels = tf.gather(class_values, tf.argmax(probabilities, axis=-1, output_type=tf.int32))
        shape = tf.shape(labels)
        inside = ((tf.range(shape[1])[None, :, None] < sizes[:, 0, None, None])
                  & (tf.range(shape[2])[None, None, :] < sizes[:, 1, None, None]))
        labels = tf.where(inside, labels, IGNORE)
        return {"labels": labels, "probabilities": probabilities,
                "class_values": class_values, "image_sizes": sizes}
