"""Baseline: SG-One (Zhang et al. 2018), similarity guidance; k-way prediction as
Eq. 3 without the residual.

Same backbone, data, training loop and evaluation as POPNet; single-stage (no KIM,
no dynamic prototypes). Variants: see configs/baselines/__init__.py.
"""

from configs.baselines import base


def get_config(arg=None):
    config = base(arg)
    config.model.method = "sgone"
    config.model.kim = False                 # single-stage
    config.model.dynamic_prototypes = False
    config.eval.head = "model"               # the baseline's own prediction
    return config
