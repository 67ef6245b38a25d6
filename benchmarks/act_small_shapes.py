"""bnlab.BatchNormAct2d against torch.nn's BN then (add and) ReLU at small shapes, where the
per-call Python and autograd work decides (forward+backward, float32, NCHW, two threads).

Claim measured: how far the layer's fixed costs leave it behind or ahead of torch's sequence on
tensors of a few thousand values, and where its kernels take over. Medians of interleaved samples
(bnlab.lab.speed_timing), microseconds per call.

    PYTHONPATH=src python benchmarks/act_small_shapes.py
"""

import torch, bnlab
from bnlab.lab import speed_cases, speed_timing
for shape in [(8,16,4,4),(32,32,8,8),(2,64,7,7),(16,512,2,2),(64,128,16,16),(1,32,32,32)]:
    for mode in ("relu_fwdbwd","addrelu_fwdbwd"):
        fns = speed_cases.contenders(shape, "nchw", torch.float32, mode, "cpu", False)
        t = speed_timing.time_interleaved({k: fns[k] for k in ("bnlab","torch")}, "cpu", 7, 0.02)
        print(shape, mode, "bnlab %.1f us torch %.1f us  %.2fx" % (t["bnlab"]*1e6, t["torch"]*1e6, t["torch"]/t["bnlab"]))
