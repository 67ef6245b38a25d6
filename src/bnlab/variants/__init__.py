"""BN variants behind the options of bnlab.BatchNorm1d/2d/3d (docs/features.md): one file per feature.

ghost.py (Ghost BN), renorm.py (Batch Renormalization), masked.py (masked BN),
accumulate.py (statistics over micro-batches), batch_stats.py (the normalization with given
batch statistics they share), options.py (constructor-option checks), dispatch.py (which
one a layer runs), reference.py (float64 NumPy specification of each, the test oracle).
"""
