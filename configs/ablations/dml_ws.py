"""Table 3, row "DML + WS": weight shifting β = 1 − epoch / max_epoch, single stage,
static prototypes."""

from configs.baselines import base


def get_config(arg=None):
    config = base(arg)
    config.model.kim = False
    config.model.dynamic_prototypes = False
    return config
