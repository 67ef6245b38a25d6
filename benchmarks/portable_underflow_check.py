"""What the coefficient-underflow check costs the portable input gradient (elementwise.grad_input).

Claim measured (forty-ninth session, DEVELOPERS.md): an eager CPU call of the portable input
gradient reads its (C,) coefficients k and a on the host (through NumPy) to find channels whose
float32 coefficients fall below the normal range, and does nothing more where none does. Two forms
of the same call on float32 CPU inputs with ordinary values (no channel so): the check left out,
and the check made. Best of --repeats timings of a few calls each (about 2 ms of them), the forms
in turn, --rounds times; microseconds per call and the ratio to the first.

    PYTHONPATH=src:benchmarks python benchmarks/portable_underflow_check.py [--shapes conv-14,mlp-small] [--threads 2]
"""

from __future__ import annotations

from bnlab import elementwise
from portable_rounded_mean import forms_arguments, print_forms


def main(argv=None) -> int:
    args = forms_arguments(argv, __doc__)
    forms = {
        "no check": lambda *args: None,
        "checked (eager CPU)": elementwise._coefficients_below_normal,
    }
    print(f"# portable_underflow_check.py --threads {args.threads}; microseconds per call, best of {args.repeats}")
    print_forms("_coefficients_below_normal", forms, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
