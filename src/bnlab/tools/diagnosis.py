"""The result of ``bnlab.diagnose``: per-layer numbers a program can read, and the table a person reads.

Thresholds for the advice column are module constants, documented where they are defined.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["LayerDiagnosis", "Diagnosis"]

# Advice thresholds. mean_shift and batch_noise are in population standard deviations.
STALE_MEAN = 0.1  # running mean off by more than 0.1 σ in some channel
STALE_VAR = 1.2  # running (var + eps) off by more than 20 % either way in some channel
NOISY_BATCHES = 0.25  # batch means scatter by more than 0.25 σ around the population mean
NEAR_ZERO_VAR = 1e-2  # population variance below 1 % of eps: a constant (dead) channel
LARGE_GAP = 0.1  # eval outputs off by more than 10 % of the train outputs' spread


@dataclass
class LayerDiagnosis:
    """What ``bnlab.diagnose`` found for one BN layer; scalars summarise the per-channel arrays.

    Attributes:
        name: qualified name in the model ("" for the model itself).
        kind: class name, e.g. "BatchNorm2d".
        channels: C.
        samples: values per channel seen (N·H·W summed over batches; selected positions if masked).
        output_gap: ‖y_eval - y_train‖ / ‖y_train - β‖ over all batches: how far evaluation mode's
            outputs are from training mode's on the same inputs (0 = identical); training mode as
            the layer does it: Ghost BN's ghost batches, Batch Renorm's r and d at its current step,
            and a frozen layer's running statistics (its gap is 0).
        mean_shift: per channel |running_mean - population mean| / sqrt(population var + eps).
        var_ratio: per channel (running_var + eps) / (population var + eps).
        batch_noise: per channel RMS over batches (ghost batches for a Ghost BN layer) of
            (batch mean - population mean) / sqrt(population var + eps).
        population_mean, population_var: the fresh statistics (unbiased variance), per channel.
        near_zero_var: channels whose population variance is below NEAR_ZERO_VAR·eps.
        eps_dominated: the other channels whose population variance is below eps.
        frozen: whether bnlab.freeze froze the layer.
        advice: short hints, most important first.
    """

    name: str
    kind: str
    channels: int
    samples: int
    output_gap: float
    mean_shift: np.ndarray
    var_ratio: np.ndarray
    batch_noise: np.ndarray
    population_mean: np.ndarray
    population_var: np.ndarray
    near_zero_var: list[int]
    eps_dominated: list[int]
    frozen: bool = False
    advice: list[str] = field(default_factory=list)

    @property
    def worst_mean_shift(self) -> float:
        return float(np.max(self.mean_shift)) if self.mean_shift.size else 0.0

    @property
    def worst_var_ratio(self) -> float:
        """The channel's ratio farthest from 1 (on a log scale)."""
        if not self.var_ratio.size:
            return 1.0
        return float(self.var_ratio[np.argmax(np.abs(np.log(self.var_ratio)))])

    @property
    def rms_batch_noise(self) -> float:
        return float(np.sqrt(np.mean(self.batch_noise**2))) if self.batch_noise.size else 0.0

    def to_dict(self) -> dict:
        """Plain Python types only (lists for arrays): ready for json.dumps."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = value.tolist()
        out.update(
            worst_mean_shift=self.worst_mean_shift,
            worst_var_ratio=self.worst_var_ratio,
            rms_batch_noise=self.rms_batch_noise,
        )
        return out


def advise(d: LayerDiagnosis) -> list[str]:
    """Hints for one layer from its numbers (thresholds above)."""
    hints = []
    if d.worst_mean_shift > STALE_MEAN or not (1 / STALE_VAR <= d.worst_var_ratio <= STALE_VAR):
        # (recalibrate leaves a frozen layer as it is)
        hints.append("stale running stats: " + ("bnlab.unfreeze, then bnlab.recalibrate" if d.frozen else "bnlab.recalibrate"))
    if d.rms_batch_noise > NOISY_BATCHES:
        hints.append("noisy batch stats (small batches?): larger batch, Ghost BN or renorm")
    if d.near_zero_var:
        hints.append(f"{len(d.near_zero_var)} dead channel(s)")
    if d.eps_dominated:
        hints.append(f"eps dominates {len(d.eps_dominated)} channel(s): lower eps or rescale")
    if not hints and d.output_gap > LARGE_GAP:
        hints.append("train/eval gap")
    if d.frozen:
        hints.append("frozen")
    return hints


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.3g}"


@dataclass
class Diagnosis:
    """Every BN layer's :class:`LayerDiagnosis`, in model order; ``str()`` gives the table."""

    layers: list[LayerDiagnosis]
    batches: int

    def to_dict(self) -> dict:
        return {"batches": self.batches, "layers": [d.to_dict() for d in self.layers]}

    def __getitem__(self, name: str) -> LayerDiagnosis:
        for d in self.layers:
            if d.name == name:
                return d
        raise KeyError(f"name: no BN layer called {name!r}; layers: {[d.name for d in self.layers]}")

    def table(self) -> str:
        """A fixed-width text table, one row per layer."""
        header = ["layer", "C", "samples", "gap", "mean shift", "var ratio", "batch noise", "~0 var", "eps-dom", "advice"]
        rows = [
            [
                d.name or "(model)",
                str(d.channels),
                str(d.samples),
                _fmt(d.output_gap),
                _fmt(d.worst_mean_shift),
                _fmt(d.worst_var_ratio),
                _fmt(d.rms_batch_noise),
                str(len(d.near_zero_var)),
                str(len(d.eps_dominated)),
                "; ".join(d.advice) or "ok",
            ]
            for d in self.layers
        ]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        note = (
            f"{len(self.layers)} BN layer(s), {self.batches} batch(es). gap: eval vs train outputs (relative); "
            "mean shift: worst |running - population| mean, in σ; var ratio: worst running/population (var+eps); "
            "batch noise: RMS batch-mean scatter, in σ."
        )
        return "\n".join(lines + [note])

    def __str__(self) -> str:
        return self.table()
