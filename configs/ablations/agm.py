"""Table 3, row "AGM": AGM only (β ≡ 1 in Eq. 5), single stage, static prototypes."""

from configs.baselines import base


def get_config(arg=None):
    config = base(arg)
    config.train.beta_schedule = "constant"
    config.train.beta_constant = 1.0
    config.model.kim = False
    config.model.dynamic_prototypes = False
    config.model.prediction_head = "agm"    # NCM is never trained here
    config.eval.head = "agm"
    return config
