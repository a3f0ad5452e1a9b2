"""Table 3, row "DML + WS + KIM": the three stages joined by KIM, static prototypes."""

from configs.baselines import base


def get_config(arg=None):
    config = base(arg)
    config.model.dynamic_prototypes = False
    return config
