"""Baseline: AMP (Siam et al. 2019), masked proxies with multi-resolution (stride 4
and 16) adaptive weight imprinting.

Same backbone, data, training loop and evaluation as POPNet; single-stage (no KIM,
no dynamic prototypes). Variants: see configs/baselines/__init__.py.
"""

from configs.baselines import base


def get_config(arg=None):
    config = base(arg)
    config.model.method = "amp"
    config.model.kim = False                 # single-stage
    config.model.dynamic_prototypes = False
    config.eval.head = "model"               # the baseline's own prediction
    return config
