"""MR signal equations and tissue parameters (BrainWeb 1.5 T values).

Units: times in ms, ADC in 1e-3 mm^2/s, gadolinium concentration in mM, b in s/mm^2.
Every contrast of a voxel is ``S = sum_k f_k * s_k`` over compartments ``k`` (tissues and
lesion parts) with volume fractions ``f_k`` and per-compartment signals ``s_k`` from the
equations below (partial volume); the ADC map is computed from the mixed b = 0 and b = 1000
diffusion signals, as a scanner does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

#: gadolinium T1 relaxivity r1 at 1.5 T, per mM per ms (4.5 /mM/s).
R1_GD = 4.5e-3
B_VALUE = 1000.0


@dataclass(frozen=True)
class TissueParams:
    """Relaxation and diffusion properties of one compartment."""

    t1: float  # ms
    t2: float  # ms
    pd: float  # proton density, relative to water
    adc: float  # 1e-3 mm^2/s
    gd: float = 0.0  # gadolinium concentration after contrast, mM

    def with_gd(self, gd: float) -> TissueParams:
        return replace(self, gd=gd)


#: Normal tissues (BrainWeb 1.5 T; ADC from DWI literature).
NORMAL: dict[str, TissueParams] = {
    "csf": TissueParams(2569.0, 329.0, 1.00, 3.00),
    "gm": TissueParams(833.0, 83.0, 0.86, 0.89),
    "wm": TissueParams(500.0, 70.0, 0.77, 0.70),
}


def csf_null_ti(t1: float = NORMAL["csf"].t1, tr: float = 9000.0) -> float:
    """Inversion time (ms) that nulls a tissue of ``t1`` in an IR sequence: 1 - 2e^{-TI/T1} + e^{-TR/T1} = 0."""
    return t1 * math.log(2.0 / (1.0 + math.exp(-tr / t1)))


@dataclass(frozen=True)
class Sequence:
    """An acquisition: ``kind`` 'se' (spin echo), 'ir' (inversion recovery), 'dwi' (SE-EPI at ``b``)."""

    kind: str
    tr: float
    te: float
    ti: float = 0.0
    b: float = 0.0
    contrast_agent: bool = False


#: The six contrasts (canonical modality names) plus the b = 0 image behind DWI/ADC.
SEQUENCES: dict[str, Sequence] = {
    "t1": Sequence("se", tr=500.0, te=15.0),
    "t2": Sequence("se", tr=4000.0, te=100.0),
    "flair": Sequence("ir", tr=9000.0, te=120.0, ti=csf_null_ti()),
    "t1ce": Sequence("se", tr=500.0, te=15.0, contrast_agent=True),
    "dwi": Sequence("dwi", tr=5000.0, te=90.0, b=B_VALUE),
    "b0": Sequence("dwi", tr=5000.0, te=90.0, b=0.0),
}


def effective_t1(p: TissueParams, contrast_agent: bool) -> float:
    """T1 (ms) after gadolinium shortening 1/T1' = 1/T1 + r1 C (only when contrast was given)."""
    if not contrast_agent or p.gd <= 0.0:
        return p.t1
    return 1.0 / (1.0 / p.t1 + R1_GD * p.gd)


def signal(p: TissueParams, seq: Sequence) -> float:
    """Noise-free signal of a pure compartment for ``seq`` (arbitrary units, PD-scaled)."""
    t1 = effective_t1(p, seq.contrast_agent)
    t2_decay = math.exp(-seq.te / p.t2)
    if seq.kind == "se":
        return p.pd * (1.0 - math.exp(-seq.tr / t1)) * t2_decay
    if seq.kind == "ir":
        return p.pd * abs(1.0 - 2.0 * math.exp(-seq.ti / t1) + math.exp(-seq.tr / t1)) * t2_decay
    if seq.kind == "dwi":
        s0 = p.pd * (1.0 - math.exp(-seq.tr / t1)) * t2_decay
        return s0 * math.exp(-seq.b * p.adc * 1e-3)
    raise ValueError(f"unknown sequence kind {seq.kind!r}")


def contrast_signal(p: TissueParams, modality: str) -> float:
    """Pure-compartment value of ``modality``; for 'adc' the ADC itself (1e-3 mm^2/s)."""
    if modality == "adc":
        return p.adc
    return signal(p, SEQUENCES[modality])


def adc_from_signals(s0: np.ndarray, sb: np.ndarray, b: float = B_VALUE) -> np.ndarray:
    """ADC (1e-3 mm^2/s) = -ln(S_b / S_0) / b, 0 where S_0 vanishes."""
    ok = (s0 > 1e-6) & (sb > 1e-9)
    out = np.zeros_like(s0)
    out[ok] = -np.log(sb[ok] / s0[ok]) / b * 1e3
    return out


def rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the complex signal ``clean + N(0, sigma) + i N(0, sigma)`` (float32)."""
    re = clean + rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(sigma)
    im = rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt(re * re + im * im)


def bias_field(axes_mm: list[np.ndarray], rng: np.random.Generator, strength: float = 0.12) -> np.ndarray:
    """Smooth multiplicative field exp(sum of low-order separable cosines), float32, ~1 +- ``strength``.

    ``axes_mm``: three 1D arrays of voxel positions (mm, relative to the head centre).
    """
    field = np.zeros(tuple(len(a) for a in axes_mm), np.float32)
    for axis, pos in enumerate(axes_mm):
        wave = np.zeros(len(pos))
        for order in (1, 2):
            wave += rng.normal(0.0, strength / 2) * np.cos(np.pi * order * pos / 240.0 + rng.uniform(0, 2 * np.pi))
        shape = [1, 1, 1]
        shape[axis] = len(pos)
        field += wave.reshape(shape).astype(np.float32)
    return np.exp(field)
