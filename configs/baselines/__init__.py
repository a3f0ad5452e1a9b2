"""The paper's baselines as configs (Experiments, Baselines; popnet_tf/models/baselines.py).

Each file takes the default experiment and changes only what differs:
`--config=configs/baselines/panet.py` (synthetic CPU scale), `...panet.py:smoke`
(the tests' tiny scale), `...panet.py:paper` (SPEC §7, GPU).
"""

from configs import paper, synthetic_cpu


def base(arg=None):
    """The config a baseline or ablation starts from: configs/paper.py for "paper",
    else configs/synthetic_cpu.py with `arg` as its variant (None, "smoke")."""
    return paper.get_config() if arg == "paper" else synthetic_cpu.get_config(arg)
