"""What the "torch" build of the CPU kernels needs from the installed torch (cpu_build builds it).

The torch build is the extension module with one more file, cpu_kernels_torch.cpp, compiled against
torch's C++ headers and linked to its libraries, through which the compiled layer calls read their
tensors and make their outputs (cpu_kernels_torch.h says why). Here: where torch's headers and
libraries are, the flags that compile and link that file, and what the build is bound to (its
cache key), so that a new torch rebuilds it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SOURCE", "API", "paths", "identity", "compile_flags", "link_flags"]

#: The file compiled against torch's headers.
SOURCE = "cpu_kernels_torch.cpp"
#: The flag that makes a variant the torch build: the glue reads tensors through cpu_kernels_torch.h.
API = "-DBNLAB_TORCH_API"


def paths() -> tuple[Path, Path]:
    """The installed torch's C++ headers and its libraries."""
    import torch

    root = Path(torch.__file__).resolve().parent
    return root / "include", root / "lib"


def identity() -> tuple[str, ...]:
    """torch's version and its Python binding library's size and time: what the torch build binds to."""
    import torch

    lib = paths()[1] / "libtorch_python.so"
    try:
        st = os.stat(lib)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    return (torch.__version__, str(lib), stamp)


def compile_flags() -> list[str]:
    """What the torch build adds to the extension module's flags: the glue's switch, torch's
    headers and torch's C++ ABI (it is told to every part, so that the library agrees with itself).
    Empty, and the torch build not tried, when torch ships no headers or ``BNLAB_TORCH_API=0``
    (for a machine where the torch build misbehaves, and for the tests of the plain build)."""
    import torch

    if os.environ.get("BNLAB_TORCH_API", "1").strip() == "0":  # its other values: cpu_environment.check_environment
        return []
    include = paths()[0]
    if not (include / "torch" / "csrc" / "autograd" / "python_variable.h").exists():
        return []
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return [API, f"-I{include}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def link_flags() -> list[str]:
    """The torch libraries cpu_kernels_torch.cpp calls into, found at run time where they were at build time."""
    lib = paths()[1]
    return [f"-L{lib}", "-ltorch_python", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]
