"""bnlab: Batch Normalization done completely, correctly and fast.

Public names:
    BatchNorm1d, BatchNorm2d, BatchNorm3d  drop-in replacements for torch.nn's layers
    LazyBatchNorm1d, LazyBatchNorm2d, ...  their lazy forms, C taken from the first input (as torch.nn's)
    BatchNormAct2d                         BatchNorm2d + residual add + ReLU, fused on GPU
    convert                                swap torch.nn BN layers for bnlab's in a model (and back)
    SyncBatchNorm                          BN over a torch.distributed group (gloo on CPU, NCCL on CUDA)
    SyncBatchNormAct2d                     BatchNormAct2d over a torch.distributed group
    fold                                   fold eval-mode BN into the conv/linear layer before (or after) it
    functional.batch_norm                  torch.nn.functional.batch_norm's signature, bnlab's code
    reference                              the float64 NumPy specification (the test oracle)
    set_backend, available_backends        choose which implementation of the primitives runs
    freeze, unfreeze                       BN layers kept in inference mode even under model.train()
    recalibrate                            running statistics recomputed as population statistics over data
    diagnose                               per-layer report: train/eval gap, stale statistics, dead channels
    empty_cpu_cache, cpu_cache_info,       the pool of reused memory for large CPU outputs
    set_cpu_cache_limit                    (torch.cuda.empty_cache's counterpart: README.md, section "Fast")
(Ghost BN, Batch Renormalization, masked BN, accumulated statistics and the non-finite guard are
options of the BatchNorm layers: docs/features.md.)
"""

from bnlab import functional, reference
from bnlab.backends import available_backends, set_backend
from bnlab.backends.cpu_pool import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from bnlab.convert import convert
from bnlab.fold import fold
from bnlab.fused import BatchNormAct2d
from bnlab.lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from bnlab.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.sync import SyncBatchNorm
from bnlab.sync_act import SyncBatchNormAct2d
from bnlab.tools.diagnose import diagnose
from bnlab.tools.freeze import freeze, unfreeze
from bnlab.tools.recalibrate import recalibrate

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "SyncBatchNormAct2d",
    "BatchNormAct2d",
    "convert",
    "fold",
    "functional",
    "reference",
    "set_backend",
    "available_backends",
    "freeze",
    "unfreeze",
    "recalibrate",
    "diagnose",
    "empty_cpu_cache",
    "cpu_cache_info",
    "set_cpu_cache_limit",
    "__version__",
]
