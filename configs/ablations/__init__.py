"""The rows of the paper's Table 3 (ablation, fold 1) as configs.

| file               | row                   | what differs from configs/synthetic_cpu.py       |
|--------------------|-----------------------|--------------------------------------------------|
| agm.py             | AGM                   | β ≡ 1, no KIM, no DP, predict with the AGM       |
| ncm.py             | NCM                   | β ≡ 0, no KIM, no DP                             |
| dml.py             | DML                   | β ≡ 0.5, no KIM, no DP                           |
| dml_ws.py          | DML + WS              | no KIM, no DP (β = 1 − epoch / max_epoch)        |
| dml_ws_kim.py      | DML + WS + KIM        | no DP (three stages)                             |
| dml_ws_kim_dp.py   | DML + WS + KIM + DP   | nothing: this is POPNet                          |

Variants as configs/baselines (`:smoke`, `:paper`).
"""
