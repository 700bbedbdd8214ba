"""Render one phantom case: warp the template, add lesion compartments, apply the signal equations.

Stored intensities (int16): structural contrasts and DWI in arbitrary scanner units (a bright
normal tissue around 1500, per-case gain); ADC in 1e-6 mm^2/s. Labels (uint8) follow the
source convention of the lesion plan. Background (outside head) is 0, as in skull-stripped data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unibrain_cli.data.phantom.anatomy import (
    TISSUES,
    Box,
    Grid,
    SubjectWarp,
    Template,
    load_template,
    random_warp,
    sample_tissues,
)
from unibrain_cli.data.phantom.layouts import CaseSpec
from unibrain_cli.data.phantom.lesions import Compartment, LesionPlan, plan_lesions
from unibrain_cli.data.phantom.physics import NORMAL, adc_from_signals, bias_field, contrast_signal, rician

#: SNR (white-matter signal / noise sigma; b = 0 signal for DWI) ranges per contrast.
SNR_RANGE: dict[str, tuple[float, float]] = {
    "t1": (25.0, 40.0), "t2": (25.0, 40.0), "flair": (20.0, 32.0), "dwi": (25.0, 35.0),
}
ADC_NOISE = 0.03  # 1e-3 mm^2/s
BRAIN_MARGIN_MM = 15.0


def case_rngs(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators of one case (anatomy, lesion, noise, text) from (seed, index)."""
    children = np.random.SeedSequence([int(seed), int(index)]).spawn(4)
    return {name: np.random.default_rng(s) for name, s in zip(("anatomy", "lesion", "noise", "text"), children)}


def case_warp(spec: CaseSpec, seed: int, resolution: int) -> SubjectWarp:
    """The subject's world -> MNI warp (reproducible from seed and case index alone)."""
    origin = spec.acquisitions[0].grid.centre
    return random_warp(case_rngs(seed, spec.index)["anatomy"], origin, load_template(resolution))


@dataclass
class GridImage:
    """All images of one acquisition grid.

    ``images``: modality -> int16 array of the full grid (what is written); ``labels``: uint8 full
    grid; ``crop``: the box of the grid that holds the head; ``tissue`` float32 (3, *crop) GM/WM/CSF
    fractions left after lesions; ``lesion`` float32 (*crop) total lesion fraction; ``mni`` float32
    (3, *crop) MNI coordinates (lesion space, i.e. before mass effect) of each voxel.
    """

    grid: Grid
    crop: Box
    images: dict[str, np.ndarray]
    labels: np.ndarray
    tissue: np.ndarray
    lesion: np.ndarray
    mni: np.ndarray


@dataclass
class CaseImages:
    """A rendered case: its spec, warp, lesion plan and one :class:`GridImage` per acquisition."""

    spec: CaseSpec
    warp: SubjectWarp
    plan: LesionPlan
    grids: list[GridImage]

    @property
    def mask_image(self) -> GridImage:
        i = next(i for i, a in enumerate(self.spec.acquisitions) if a.mask_path is not None)
        return self.grids[i]


def _sub_box(warp: SubjectWarp, grid: Grid, crop: Box, lo: np.ndarray, hi: np.ndarray) -> Box | None:
    """Crop-relative box covering the MNI box [lo, hi] (+ elastic margin), or None if empty."""
    box = warp.box_for(grid, lo, hi, margin=12.0)
    out = []
    for b, c in zip(box, crop):
        start = max(b.start, c.start) - c.start
        stop = min(b.stop, c.stop) - c.start
        if stop <= start:
            return None
        out.append(slice(start, stop))
    return tuple(out)  # type: ignore[return-value]


def _soft(level: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (mm): 1 inside, 0 outside, linear over ``edge``."""
    return np.clip(np.float32(0.5) - level / np.float32(edge), 0.0, 1.0)


def render_grid(template: Template, warp: SubjectWarp, plan: LesionPlan, grid: Grid,
                modalities: tuple[str, ...], settings: dict[str, tuple[float, float]],
                rng: np.random.Generator) -> GridImage:
    """Render ``modalities`` of one case on ``grid``. ``settings``: modality -> (gain, noise sigma)."""
    crop = warp.box_for(grid, template.brain_lo, template.brain_hi, margin=BRAIN_MARGIN_MM)
    mni = warp.grid_to_mni(grid, crop)
    tissue_coords = mni
    for me in plan.mass_effects:
        box = _sub_box(warp, grid, crop, *me.bounds())
        if box is not None:
            if tissue_coords is mni:
                tissue_coords = mni.copy()
            tissue_coords[(slice(None), *box)] = me.apply(mni[(slice(None), *box)])
    p = sample_tissues(template, tissue_coords)
    del tissue_coords
    bg = np.clip(1.0 - p.sum(0), 0.0, 1.0)
    edge = float(np.exp(np.log(grid.spacing).mean()))

    parts: list[tuple[Box, np.ndarray, Compartment]] = []
    for comp in plan.compartments:
        box = _sub_box(warp, grid, crop, *comp.shape.bounds())
        if box is None:
            continue
        occ = _soft(comp.shape.level(mni[(slice(None), *box)]), edge)
        if not occ.any():
            continue
        frac = np.zeros_like(occ)
        for t in range(3):
            if comp.affinity[t] > 0:
                take = occ * np.float32(comp.affinity[t]) * p[(t, *box)]
                p[(t, *box)] -= take
                frac += take
        if comp.affinity[3] > 0:
            take = occ * np.float32(comp.affinity[3]) * bg[box]
            bg[box] -= take
            frac += take
        parts.append((box, frac, comp))

    needed = [m for m in modalities if m != "adc"]
    if "adc" in modalities:
        needed += [m for m in ("dwi", "b0") if m not in needed]
    clean: dict[str, np.ndarray] = {}
    for mod in needed:
        s = sum(p[t] * np.float32(contrast_signal(NORMAL[name], mod)) for t, name in enumerate(TISSUES))
        for box, frac, comp in parts:
            s[box] += frac * np.float32(contrast_signal(comp.params, mod))
        clean[mod] = s

    lesion = np.zeros(mni.shape[1:], np.float32)
    best = np.zeros_like(lesion)
    label_crop = np.zeros(lesion.shape, np.uint8)
    for box, frac, comp in parts:
        lesion[box] += frac
        win = frac > best[box]
        best[box] = np.where(win, frac, best[box])
        label_crop[box] = np.where(win, comp.label, label_crop[box])
    # a voxel is lesion when lesion parts fill at least half of it (tiny lesions: half their peak)
    label_crop[lesion < min(0.5, 0.5 * float(lesion.max(initial=0.0)))] = 0
    foreground = bg < 0.5

    axes = [grid.axis_world(a, crop[a].start, crop[a].stop) - warp.origin[a] for a in range(3)]
    bias = bias_field(axes, rng)[foreground]
    images: dict[str, np.ndarray] = {}
    for mod in modalities:
        if mod == "adc":
            values = adc_from_signals(clean["b0"][foreground], clean["dwi"][foreground])
            values += rng.standard_normal(values.shape, dtype=np.float32) * np.float32(ADC_NOISE)
            values = np.clip(values, 0.0, None) * np.float32(1000.0)
        else:
            gain, sigma = settings[mod]
            values = rician(clean[mod][foreground] * bias, sigma, rng) * np.float32(gain)
        stored = np.zeros(lesion.shape, np.int16)
        stored[foreground] = np.clip(np.rint(values), 0, 32767).astype(np.int16)
        full = np.zeros(grid.shape, np.int16)
        full[crop] = stored
        images[mod] = full
    labels = np.zeros(grid.shape, np.uint8)
    labels[crop] = label_crop
    return GridImage(grid, crop, images, labels, p, lesion, mni)


def acquisition_settings(rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """Per-case (gain, noise sigma) of each stored contrast; T1ce shares T1's (same sequence)."""
    out: dict[str, tuple[float, float]] = {}
    for mod in ("t1", "t2", "flair", "dwi"):
        ref_mod = "b0" if mod == "dwi" else mod
        ref = contrast_signal(NORMAL["wm"], ref_mod)
        top = max(contrast_signal(p, mod) for p in NORMAL.values())
        gain = 1500.0 / top * rng.uniform(0.85, 1.15)
        out[mod] = (gain, ref / rng.uniform(*SNR_RANGE[mod]))
    out["t1ce"] = out["t1"]
    return out


def simulate_case(spec: CaseSpec, seed: int, resolution: int) -> CaseImages:
    """Render every acquisition of ``spec`` (deterministic in seed, case index and resolution)."""
    template = load_template(resolution)
    rngs = case_rngs(seed, spec.index)
    warp = random_warp(rngs["anatomy"], spec.acquisitions[0].grid.centre, template)
    plan = plan_lesions(spec.disease, rngs["lesion"])
    settings = acquisition_settings(rngs["noise"])
    grids = [render_grid(template, warp, plan, acq.grid, acq.modalities, settings, rngs["noise"])
             for acq in spec.acquisitions]
    return CaseImages(spec, warp, plan, grids)
