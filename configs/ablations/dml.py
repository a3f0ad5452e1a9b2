"""Table 3, row "DML": both heads, fixed β ≡ 0.5 (no weight shifting), single stage,
static prototypes."""

from configs.baselines import base


def get_config(arg=None):
    config = base(arg)
    config.train.beta_schedule = "constant"
    config.train.beta_constant = 0.5
    config.model.kim = False
    config.model.dynamic_prototypes = False
    return config
