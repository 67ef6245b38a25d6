"""One-call tools over a whole model's BN layers (docs/features.md): one file per tool.

freeze.py (freeze/unfreeze that survive model.train()), recalibrate.py (population statistics),
diagnose.py (why eval accuracy is bad), layers.py (finding BN layers), collect.py (the
pass over data that recalibrate and diagnose share).
"""
