"""POPNet: the three stages built from a config and joined through KIM.

Example:
    >>> from configs import synthetic_cpu
    >>> config = synthetic_cpu.get_config()
    >>> s1 = build_stage(config, 1)
    >>> s2 = build_stage(config, 2, previous=s1)
    >>> s3 = build_stage(config, 3, previous=s2)
"""

from __future__ import annotations

import keras
import numpy as np

from popnet_tf import classes
from popnet_tf.models import baselines
from popnet_tf.models.stages import ForegroundStage, OneShotStage


def encoder_kwargs(config) -> dict:
    """The `DeepLabV3PlusEncoder` arguments of a config's `model` section."""
    m = config.model
    return {
        "backbone": m.backbone,
        "filters": m.filters,
        "aspp_rates": tuple(m.aspp_rates),
        "aspp_filters": m.aspp_filters,
        "low_level_filters": m.low_level_filters,
        "decoder_convs": m.decoder_convs,
        "aspp_dropout": m.aspp_dropout,
        "backbone_weights": m.backbone_weights or None,
        "backbone_kwargs": _plain(m.get("backbone_kwargs")),
    }


def _plain(value):
    """A ConfigDict (or None) as a plain dict of plain values (lists as tuples)."""
    if value is None:
        return {}
    items = value.to_dict().items() if hasattr(value, "to_dict") else dict(value).items()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in items}


def stages_needed(config, stage: int) -> tuple[int, ...]:
    """The stages a stage depends on, itself included, in training order.

    Without KIM (the ablation rows before "+KIM") a one-shot stage stands alone.
    """
    if stage == 1 or not config.model.kim:
        return (stage,)
    return tuple(range(1, stage + 1))


def build_stage(config, stage: int, previous=None) -> keras.Model:
    """A stage model; `previous` must be the built previous stage when KIM is on.

    `config.model.method` other than "popnet" builds that baseline instead
    (`models.baselines`, one-shot stages only).
    """
    if stage == 1:
        return ForegroundStage(encoder=encoder_kwargs(config), name="stage1")
    if stage not in (2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    method = config.model.get("method", "popnet")
    if method != "popnet":  # the paper's baselines (configs/baselines/), single-stage
        return baselines.build_baseline(config, stage, encoder_kwargs(config))
    if config.model.kim and previous is None:
        raise ValueError(f"stage {stage} with KIM needs the trained stage {stage - 1}")
    return OneShotStage(
        num_classes=classes.STAGE_NUM_CLASSES[stage],
        encoder=encoder_kwargs(config),
        previous=previous if config.model.kim else None,
        agm_hidden_convs=config.model.agm_hidden_convs,
        momentum=config.model.momentum,
        initial_temperature=config.model.initial_temperature,
        prediction_head=config.model.prediction_head,
        dynamic_prototypes=config.model.dynamic_prototypes,
        name=f"stage{stage}",
    )


def init_encoder_from(model: keras.Model, previous: keras.Model) -> None:
    """Starts a stage's encoder from the trained previous stage's encoder.

    Without a pre-trained backbone (the paper's is COCO's; nothing can be downloaded
    here), the previous stage is the best starting point at hand: it has already
    learned to find the person (stage 1) or its main areas (stage 2). The stage keeps
    its own encoder (SPEC §6): the weights are copied, not shared, and the previous
    stage stays frozen. Both encoders must have the same architecture.
    """
    source, target = previous.encoder, model.encoder

    def architecture(layer):
        return {k: v for k, v in layer.get_config().items()
                if k not in ("name", "trainable", "dtype")}

    if architecture(source) != architecture(target):
        raise ValueError(f"{model.name}: model.init_from_previous needs the same encoder "
                         f"as {previous.name}")
    target.set_weights(source.get_weights())


def configure_batch_norm(model: keras.Model, momentum: float | None = None,
                         synchronized: bool = False) -> None:
    """Sets every BatchNormalization layer's momentum and cross-replica sync.

    Called once the variables exist (BN layers are created in `build`). Momentum 0.9
    is PyTorch's default (0.1 in its convention), the authors' framework: with a few
    thousand steps from random initialisation, Keras' 0.99 leaves the inference
    statistics far behind the weights. `synchronized` all-reduces the batch
    statistics under several replicas, so a step sees the global batch's statistics
    as on one device.
    """
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            if momentum is not None:
                layer.momentum = momentum
            layer.synchronized = synchronized


def dummy_batch(stage: int, size: int, batch: int = 1) -> dict:
    """A small all-zeros batch of the stage's inputs, used to build variables."""
    image = np.zeros((batch, size, size, 3), np.float32)
    if stage == 1:
        return {"image": image}
    mask = np.zeros((batch, size, size), np.int32)
    mask[:, : size // 2] = 1  # one foreground class so every branch runs
    return {"query_image": image, "support_image": image, "support_mask": mask}


def build_variables(model: keras.Model, stage: int, size: int) -> None:
    """Creates every variable (the AGM included: the stage's `build` makes it) by
    one inference call on zeros, so checkpoints restore into a complete model."""
    batch = dummy_batch(stage, size)
    if stage == 1:
        model(batch["image"], training=False)
    else:
        model(batch, training=False, use_dynamic=False)
    # A backbone weight file is loaded once the variables exist (encoder.build).
    from popnet_tf.models.encoder import DeepLabV3PlusEncoder

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, DeepLabV3PlusEncoder):
            layer.load_pending_backbone_weights()
