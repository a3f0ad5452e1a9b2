"""The paper's setting (SPEC §7): Xception DeepLab v3+, 512x512, batch 2, 30 epochs.

GPU scale. `--config=configs/paper.py:oneway` trains the one-way variant.
"""

from configs.common import base_config


def get_config(arg=None):
    config = base_config()
    if arg == "oneway":
        config.train.way = "oneway"
    elif arg:
        raise ValueError(f"configs/paper.py: unknown variant {arg!r} (known: oneway)")
    return config
