"""Baseline: Fine-tune (Caelles et al. 2017): train on D_train, then tune the last two
convs and the classifier on each test support for `eval.finetune_steps` steps
(popnet_tf.eval_lib.finetune_kway, run by popnet_tf.evaluate).

Same backbone, data, training loop and evaluation as POPNet; single-stage (no KIM,
no dynamic prototypes). Variants: see configs/baselines/__init__.py.
"""

from configs.baselines import base


def get_config(arg=None):
    config = base(arg)
    config.model.method = "finetune"
    config.model.kim = False                 # single-stage
    config.model.dynamic_prototypes = False
    config.eval.head = "model"               # the baseline's own prediction
    return config
