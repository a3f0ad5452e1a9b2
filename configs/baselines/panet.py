"""Baseline: PANet (Wang et al. 2019), non-parametric prototypes and the prototype
alignment loss; k-way by k binary supports.

Same backbone, data, training loop and evaluation as POPNet; single-stage (no KIM,
no dynamic prototypes). Variants: see configs/baselines/__init__.py.
"""

from configs.baselines import base


def get_config(arg=None):
    config = base(arg)
    config.model.method = "panet"
    config.model.kim = False                 # single-stage
    config.model.dynamic_prototypes = False
    config.eval.head = "model"               # the baseline's own prediction
    return config
