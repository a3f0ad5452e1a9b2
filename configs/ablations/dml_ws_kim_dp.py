"""Table 3, row "DML + WS + KIM + DP": POPNet itself (the default config, unchanged)."""

from configs.baselines import base


def get_config(arg=None):
    return base(arg)
