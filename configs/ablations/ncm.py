"""Table 3, row "NCM": NCM only (β ≡ 0 in Eq. 5), single stage, static prototypes."""

from configs.baselines import base


def get_config(arg=None):
    config = base(arg)
    config.train.beta_schedule = "constant"
    config.train.beta_constant = 0.0
    config.model.kim = False
    config.model.dynamic_prototypes = False
    return config
