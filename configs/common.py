"""The config schema shared by every experiment, with the paper's values (SPEC §6, §7).

Each experiment file starts from `base_config()` and changes what differs.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.deterministic = True  # tf.config.experimental.enable_op_determinism()

    c.data = ml_collections.ConfigDict()
    c.data.dir = "tfrecords/atr_os"          # built ATR-OS dataset (manifest.json + shards)
    c.data.synthetic = False                 # generate + build a synthetic dataset when missing
    c.data.synthetic_atr_dir = ""            # raw ATR-layout folder for it ("" = <dir>_atr)
    c.data.synthetic_num_images = 0
    c.data.synthetic_seed = 0
    c.data.num_query_train = 8000            # SPEC §5
    c.data.num_test_query = 500              # SPEC §5
    c.data.num_test_support = 500            # SPEC §5
    c.data.fold_set = "paper"                # SPEC §4; "journal" for the authors' later folds
    c.data.resize_long_side = 0              # 0: keep ATR's own size (~400x600)
    c.data.crop_size = 512                   # SPEC §7, k-way
    c.data.crop_width = 0                    # columns of the k-way crop; 0: square
    c.data.support_crop_size = 0             # k-way supports' crop rows; 0: the query's crop
    c.data.support_crop_width = 0            # its columns; 0: as many as its rows
    c.data.support_crop_stages = (3,)        # the one-shot stages that use the support crop
    c.data.oneway_crop_size = 576            # SPEC §7, one-way
    c.data.stage1_crop_size = 0              # 0: as crop_size
    c.data.stage1_crop_width = 0             # columns of stage 1's crop; 0: square (k-way's if size 0)
    c.data.scale_range = (0.5, 2.0)          # SPEC §7
    c.data.cache_decoded = False             # hold decoded training images in memory (small datasets)
    c.data.eval_size = 608                   # test images fit in 608x608 (600 ATR long side)

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "xception"            # SPEC §6: DeepLab v3+ Xception, OS16
    c.model.backbone_weights = ""            # path of a user's .weights.h5 ("" = random init)
    # Extra arguments of models.backbones.build_backbone (e.g. "small": widths, blocks).
    c.model.backbone_kwargs = ml_collections.ConfigDict()
    c.model.filters = 256                    # K, SPEC §6
    c.model.aspp_rates = (6, 12, 18)         # DeepLab v3+ at OS16
    c.model.aspp_filters = 256
    c.model.low_level_filters = 48
    c.model.decoder_convs = 2
    c.model.aspp_dropout = 0.1               # TF DeepLab's reference value
    c.model.agm_hidden_convs = 2             # the authors' per-class AGM decoder: two 3x3 convs
    c.model.momentum = 0.001                 # α of Eq. 2 (SPEC §6)
    c.model.initial_temperature = 10.0       # NCM τ (authors' code)
    c.model.prediction_head = "ncm"          # SPEC §6
    c.model.kim = True                       # three stages joined by KIM
    c.model.dynamic_prototypes = True        # DP
    # Start a one-shot stage's encoder from the trained previous stage's encoder
    # (False: random initialisation, or the backbone_weights file).
    c.model.init_from_previous = False
    c.model.bn_momentum = 0.9                # PyTorch's default (its 0.1), the authors' framework
    # "popnet", or a baseline of the paper (Experiments, Baselines; configs/baselines/):
    # "sgone", "panet", "amp", "finetune" (popnet_tf/models/baselines.py).
    c.model.method = "popnet"
    c.model.panet_scale = 20.0               # PANet: α of the scaled cosine (PANet paper)
    c.model.panet_align_weight = 1.0         # PANet: λ of the prototype alignment loss
    c.model.amp_alpha = 0.25                 # AMP: imprinting rate of base-class weights

    c.train = ml_collections.ConfigDict()
    c.train.way = "kway"
    c.train.batch_size = 2                   # SPEC §7
    c.train.stage1_batch_size = 0            # 0: as batch_size
    c.train.epochs = 30                      # one-shot stages, SPEC §7
    c.train.stage1_epochs = 30
    c.train.steps_per_epoch = 4000           # 8000 training queries / batch 2
    c.train.stage1_steps_per_epoch = 0       # 0: as steps_per_epoch
    c.train.optimizer = "sgd"
    c.train.learning_rate = 1e-3             # SPEC §7
    c.train.momentum = 0.9
    c.train.weight_decay = 5e-4
    c.train.poly_power = 0.9
    c.train.ema_momentum = 0.0               # > 0: end each stage with this moving average of its weights
    c.train.prototype_warmup = 15            # epochs with static prototypes (SPEC §6)
    c.train.beta_schedule = "shift"          # β = 1 − epoch/max_epoch; "constant" for ablations
    c.train.beta_constant = 0.5
    c.train.mixed_precision = "float32"      # or "mixed_float16", "mixed_bfloat16", "auto" (bf16 where native)
    c.train.jit_compile = False
    c.train.strategy = "auto"
    c.train.checkpoints_to_keep = 3
    c.train.log_every = 50
    c.train.validate_every = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.head = "ncm"
    # Gate the head by stage 1's human probability (evaluate, export, predict): off, as
    # SPEC §6 predicts from NCM alone; on, background cannot take a one-shot class.
    c.eval.foreground_gate = False
    c.eval.max_queries = 0                   # 0: all of q_test (SPEC §5)
    c.eval.val_queries = 50                  # per-epoch validation on a subset
    c.eval.num_logged_examples = 4
    c.eval.oneway_pairs_per_class = 500
    # Fine-tune baseline: plain SGD steps on each test support (last two decoder convs
    # and the classifier, BatchNorm in inference mode) before predicting its queries.
    c.eval.finetune_steps = 10
    c.eval.finetune_learning_rate = 0.01
    return c
