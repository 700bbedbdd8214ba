"""Lesions as compartments with modified tissue parameters, planned in MNI space.

A :class:`LesionPlan` lists compartments (necrosis, enhancing tumour, oedema, infarct ...),
each a soft shape in MNI millimetres with its own :class:`~.physics.TissueParams`, a label in
the source's mask convention and a tissue *affinity*: the fraction of each underlying
compartment (GM, WM, CSF, background) it takes over where its shape is 1. Compartments are
applied in order, so a necrotic core placed before the enhancing shell leaves a ring, and
oedema (affinity mostly to WM) spreads along white matter. Mass effect is a radial push of
the surrounding tissue away from a centre (:class:`MassEffect`). The same signal equations
then give every contrast, so all six images agree physically.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from unibrain_cli.data.phantom.anatomy import Template, load_template, lobe_at, tentorium_z
from unibrain_cli.data.phantom.physics import TissueParams

# label conventions of the sources
BRATS_NECROSIS, BRATS_OEDEMA, BRATS_ENHANCING = 1, 2, 3
ISLES_LESION = 1
WMH_LESION, WMH_OTHER = 1, 2

Affinity = tuple[float, float, float, float]  # GM, WM, CSF, background
INTRA_AXIAL: Affinity = (1.0, 1.0, 1.0, 0.0)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random 3x3 rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def frame_with_axis(axis: np.ndarray) -> np.ndarray:
    """Rotation matrix whose third column is the unit vector ``axis``."""
    a = axis / np.linalg.norm(axis)
    helper = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(a, helper)
    u /= np.linalg.norm(u)
    v = np.cross(a, u)
    return np.stack([u, v, a], axis=1)


@dataclass(frozen=True)
class Blob:
    """Irregular ellipsoid: ``radii`` (mm) along the columns of ``rotation``, boundary wobble.

    ``waves`` (n, 4): wave vectors (rad/mm, columns 0-2) and phases; ``wobble`` is the relative
    radius modulation amplitude.
    """

    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    waves: np.ndarray
    wobble: float = 0.1

    def level(self, m: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm; < 0 inside) at MNI points ``m`` (3, ...)."""
        d = m - self.centre.reshape(3, *([1] * (m.ndim - 1))).astype(np.float32)
        q = np.tensordot((self.rotation / self.radii).T.astype(np.float32), d, axes=1)
        rho = np.sqrt((q * q).sum(0))
        r_mean = float(np.mean(self.radii))
        # lobulation depends on direction only (star-shaped blob): waves on the sphere of radius r_mean
        unit = d * (np.float32(r_mean) / (np.sqrt((d * d).sum(0)) + np.float32(1e-3)))
        wob = np.zeros_like(rho)
        for kx, ky, kz, ph in self.waves:
            wob += np.sin(kx * unit[0] + ky * unit[1] + kz * unit[2] + np.float32(ph))
        wob *= np.float32(self.wobble / max(len(self.waves), 1) ** 0.5)
        return (rho - 1.0 - wob) * np.float32(r_mean)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """MNI bounding box (lo, hi) in mm, generous."""
        r = float(np.max(self.radii)) * (1.0 + 2.5 * self.wobble) + 2.0
        return self.centre - r, self.centre + r


@dataclass(frozen=True)
class Wedge:
    """Vascular-territory wedge: a cone from ``apex`` along ``axis`` with ``half_angle`` (rad),
    between ``r_inner`` and ``r_outer`` mm, kept in one hemisphere (``side`` = sign of MNI x)
    and above the tentorium."""

    apex: np.ndarray
    axis: np.ndarray
    half_angle: float
    r_inner: float
    r_outer: float
    side: int
    waves: np.ndarray
    wobble: float = 0.08

    def level(self, m: np.ndarray) -> np.ndarray:
        d = m - self.apex.reshape(3, *([1] * (m.ndim - 1))).astype(np.float32)
        r = np.sqrt((d * d).sum(0)) + np.float32(1e-6)
        cos = np.tensordot(self.axis.astype(np.float32), d, axes=1) / r
        ang = np.arccos(np.clip(cos, -1.0, 1.0))
        wob = np.zeros_like(r)
        for kx, ky, kz, ph in self.waves:
            wob += np.sin(kx * m[0] + ky * m[1] + kz * m[2] + np.float32(ph))
        wob *= np.float32(self.wobble * self.half_angle / max(len(self.waves), 1) ** 0.5)
        lvl = (ang - np.float32(self.half_angle) - wob) * r
        lvl = np.maximum(lvl, np.float32(self.r_inner) - r)
        lvl = np.maximum(lvl, r - np.float32(self.r_outer))
        lvl = np.maximum(lvl, np.float32(2.0) - np.float32(self.side) * m[0])
        tent = np.where(m[1] < -40.0, tentorium_z(m[1]) - m[2], np.float32(-1e3)).astype(np.float32)
        return np.maximum(lvl, tent)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        frame = frame_with_axis(self.axis)
        phi = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        t = self.half_angle * 1.2
        dirs = np.stack([np.sin(t) * np.cos(phi), np.sin(t) * np.sin(phi), np.full_like(phi, np.cos(t))], 1)
        pts = np.vstack([self.apex, self.apex + self.r_outer * self.axis, self.apex + self.r_outer * dirs @ frame.T])
        return pts.min(0) - 3.0, pts.max(0) + 3.0


Shape = Blob | Wedge


@dataclass(frozen=True)
class Compartment:
    """One lesion part: ``role`` (necrosis, enhancing, core, oedema, meningioma, tail, infarct,
    wmh, lacune), its shape, tissue parameters, mask ``label`` and ``affinity``; ``lesion`` numbers
    the separate lesions of a multi-lesion disease."""

    role: str
    shape: Shape
    params: TissueParams
    label: int
    affinity: Affinity = INTRA_AXIAL
    lesion: int = 0


@dataclass(frozen=True)
class MassEffect:
    """Radial push of tissue away from ``centre``: tissue is sampled at
    ``c + (m - c)(1 - amplitude * exp(-|m - c|^2 / radius^2))`` (monotone for amplitude < 1)."""

    centre: np.ndarray
    amplitude: float
    radius: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = 2.7 * self.radius
        return self.centre - r, self.centre + r

    def apply(self, m: np.ndarray) -> np.ndarray:
        """Tissue sampling coordinates for lesion-space points ``m`` (3, ...)."""
        d = m - self.centre.reshape(3, *([1] * (m.ndim - 1))).astype(np.float32)
        g = np.exp(-(d * d).sum(0) / np.float32(self.radius**2))
        return m - d * (np.float32(self.amplitude) * g)

    def displacement_at(self, distance: float) -> float:
        """How far (mm) tissue originally ``distance`` mm from the centre is pushed outwards."""
        lo, hi = distance, distance + self.amplitude * self.radius + 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if mid * (1 - self.amplitude * math.exp(-(mid / self.radius) ** 2)) < distance:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2 - distance


@dataclass(frozen=True)
class LesionPlan:
    """Everything drawn for one case's pathology; ``info`` holds descriptive facts for reports
    (pattern, territory, grade ...) that are true by construction."""

    disease: str
    compartments: tuple[Compartment, ...]
    mass_effects: tuple[MassEffect, ...] = ()
    info: dict[str, object] = field(default_factory=dict)

    def midline_shift_mm(self) -> float:
        """Largest displacement of the midline plane (MNI x = 0) caused by the mass effects."""
        return max((me.displacement_at(abs(float(me.centre[0]))) for me in self.mass_effects), default=0.0)


@dataclass(frozen=True)
class Candidates:
    """Candidate MNI centres (N, 3) for lesion placement, with their depth (mm) in the brain."""

    wm_deep: np.ndarray
    wm_deep_depth: np.ndarray
    junction: np.ndarray
    surface: np.ndarray
    surface_normal: np.ndarray
    periventricular: np.ndarray
    deep_wm: np.ndarray


@functools.lru_cache(maxsize=1)
def candidates() -> Candidates:
    """Placement candidates derived (once per process) from the 2 mm template maps."""
    t: Template = load_template(2)
    gm, wm, csf = t.maps
    mask = (gm + wm + csf) > 0.5
    depth = ndi.distance_transform_edt(mask).astype(np.float32) * t.spacing
    sp = t.spacing
    ijk = np.indices(gm.shape, dtype=np.float32).reshape(3, -1).T
    mni = t.voxel_to_mni(ijk).reshape(*gm.shape, 3)
    cerebrum = (lobe_at(mni.reshape(-1, 3)) != "cerebellum").reshape(gm.shape) & (mni[..., 2] > -25)
    rng = np.random.default_rng(0)
    jitter = rng.uniform(-sp / 2, sp / 2, mni.shape).astype(np.float32)  # candidates off the voxel lattice
    mni = mni + jitter
    absx = np.abs(mni[..., 0])

    def pts(sel: np.ndarray) -> np.ndarray:
        return mni[sel]

    wm_deep = (wm > 0.85) & (depth > 20) & cerebrum & (absx > 15)
    junction = (gm > 0.35) & (gm < 0.65) & (wm > 0.25) & (depth > 8) & cerebrum & (absx > 12) & (mni[..., 2] > -20)
    surface = mask & (depth <= 1.5 * sp) & (mni[..., 2] > -5) & (absx > 12) & cerebrum
    smooth = ndi.gaussian_filter(mask.astype(np.float32), 2.0 / sp)
    grad = np.stack(np.gradient(smooth), -1)[surface]
    normal = -grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-6)
    ventricles = (csf > 0.7) & (depth > 22) & (absx < 30)
    vent_dist = ndi.distance_transform_edt(~ventricles) * sp
    periventricular = (wm > 0.6) & (vent_dist >= 2) & (vent_dist <= 9) & cerebrum & (absx > 3)
    deep_wm = (wm > 0.85) & (depth > 12) & cerebrum & (absx > 8)
    return Candidates(pts(wm_deep), depth[wm_deep], pts(junction), pts(surface), normal,
                      pts(periventricular), pts(deep_wm))


def _waves(rng: np.random.Generator, wavelength: float, n: int = 4) -> np.ndarray:
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.4, n))
    return np.concatenate([dirs * k[:, None], rng.uniform(0, 2 * np.pi, (n, 1))], axis=1)


def _blob(rng: np.random.Generator, centre: np.ndarray, radius: float, aniso: float = 0.2,
          wobble: float = 0.1, rotation: np.ndarray | None = None, waves: np.ndarray | None = None) -> Blob:
    radii = radius * rng.uniform(1 - aniso, 1 + aniso, 3)
    rot = random_rotation(rng) if rotation is None else rotation
    return Blob(np.asarray(centre, float), radii, rot, _waves(rng, 1.5 * radius) if waves is None else waves, wobble)


def _scaled(blob: Blob, factor: float | np.ndarray, add: float = 0.0, wobble: float | None = None,
            shift: np.ndarray | None = None) -> Blob:
    centre = blob.centre if shift is None else blob.centre + shift
    return Blob(centre, blob.radii * factor + add, blob.rotation, blob.waves,
                blob.wobble if wobble is None else wobble)


def _oedema_params(rng: np.random.Generator) -> TissueParams:
    return TissueParams(rng.uniform(850, 1100), rng.uniform(115, 160), rng.uniform(0.86, 0.92), rng.uniform(1.3, 1.7))


def _necrosis_params(rng: np.random.Generator) -> TissueParams:
    return TissueParams(rng.uniform(1800, 2300), rng.uniform(180, 260), 0.95, rng.uniform(1.8, 2.5))


def _enhancing_params(rng: np.random.Generator, adc: tuple[float, float]) -> TissueParams:
    return TissueParams(rng.uniform(1050, 1350), rng.uniform(95, 125), 0.88, rng.uniform(*adc),
                        gd=rng.uniform(0.2, 0.45))


def plan_glioma(rng: np.random.Generator, cands: Candidates) -> LesionPlan:
    """Intra-axial WM mass; high grade (80%): necrosis ringed by enhancement; wide oedema; mass effect."""
    radius = rng.uniform(10.0, 19.0)
    ok = np.flatnonzero(cands.wm_deep_depth >= radius + 6.0)
    if len(ok) == 0:
        ok = np.argsort(cands.wm_deep_depth)[-50:]
        radius = float(cands.wm_deep_depth[ok].min()) - 6.0
    centre = cands.wm_deep[rng.choice(ok)] + rng.normal(0, 1.0, 3)
    outer = _blob(rng, centre, radius, aniso=0.2, wobble=0.12)
    high_grade = bool(rng.random() < 0.8)
    comps: list[Compartment] = []
    if high_grade:
        inner = _scaled(outer, rng.uniform(0.4, 0.65), wobble=0.15, shift=rng.normal(0, 1.5, 3))
        comps.append(Compartment("necrosis", inner, _necrosis_params(rng), BRATS_NECROSIS))
        comps.append(Compartment("enhancing", outer, _enhancing_params(rng, (0.9, 1.2)), BRATS_ENHANCING))
    else:
        core = TissueParams(rng.uniform(1100, 1400), rng.uniform(130, 180), 0.9, rng.uniform(1.1, 1.4))
        comps.append(Compartment("core", outer, core, BRATS_NECROSIS))
    spread = rng.uniform(5.0, 15.0)
    oedema = Blob(outer.centre, outer.radii + spread, outer.rotation, _waves(rng, 1.2 * radius), 0.15)
    comps.append(Compartment("oedema", oedema, _oedema_params(rng), BRATS_OEDEMA, (0.3, 1.0, 0.0, 0.0)))
    amp = rng.uniform(0.2, 0.4) if high_grade else rng.uniform(0.1, 0.25)
    mass = MassEffect(outer.centre, float(amp), 1.5 * radius)
    info = {"pattern": "ring" if high_grade else "none", "grade": "high" if high_grade else "low"}
    return LesionPlan("glioma", tuple(comps), (mass,), info)


def plan_meningioma(rng: np.random.Generator, cands: Candidates) -> LesionPlan:
    """Extra-axial dural-based mass indenting the brain; homogeneous enhancement, dural tail."""
    radius = rng.uniform(10.0, 22.0)
    i = rng.integers(len(cands.surface))
    point, normal = cands.surface[i], cands.surface_normal[i]
    centre = point + normal * rng.uniform(0.0, 0.35) * radius
    tumour = _blob(rng, centre, radius, aniso=0.12, wobble=0.05)
    params = TissueParams(rng.uniform(800, 900), rng.uniform(78, 95), rng.uniform(0.84, 0.9),
                          rng.uniform(0.8, 1.0), gd=rng.uniform(0.35, 0.5))
    comps = [Compartment("meningioma", tumour, params, BRATS_ENHANCING, (1.0, 1.0, 1.0, 1.0))]
    tail_len = rng.uniform(8.0, 16.0)
    tail = Blob(point + normal * 1.0, np.array([radius + tail_len, radius + tail_len * rng.uniform(0.6, 1.0), 1.6]),
                frame_with_axis(normal), _waves(rng, radius), 0.05)
    dura = TissueParams(1000.0, 80.0, 0.8, 1.0, gd=rng.uniform(0.25, 0.4))
    comps.append(Compartment("tail", tail, dura, BRATS_ENHANCING, (0.3, 0.0, 1.0, 1.0)))
    has_oedema = bool(rng.random() < 0.4)
    if has_oedema:
        ring = Blob(tumour.centre, tumour.radii + rng.uniform(6.0, 14.0), tumour.rotation, _waves(rng, radius), 0.2)
        comps.append(Compartment("oedema", ring, _oedema_params(rng), BRATS_OEDEMA, (0.6, 1.0, 0.0, 0.0)))
    mass = MassEffect(tumour.centre, float(rng.uniform(0.45, 0.65)), 1.2 * radius)
    return LesionPlan("meningioma", tuple(comps), (mass,), {"pattern": "homogeneous", "dural_tail": True})


def plan_metastasis(rng: np.random.Generator, cands: Candidates) -> LesionPlan:
    """One to four round lesions at the grey-white junction, ring (>= 7 mm) or nodular enhancement,
    oedema 2.5-3.8x the lesion radius."""
    count = int(rng.choice([1, 1, 2, 3, 4]))
    placed: list[tuple[np.ndarray, float, float]] = []
    for _ in range(200):
        if len(placed) == count:
            break
        radius = rng.uniform(4.0, 11.0)
        reach = radius * rng.uniform(2.2, 3.5)
        c = cands.junction[rng.integers(len(cands.junction))]
        if all(np.linalg.norm(c - pc) > reach + pr + 6.0 for pc, _, pr in placed):
            placed.append((c, radius, reach))
    comps: list[Compartment] = []
    masses: list[MassEffect] = []
    patterns = []
    for n, (c, radius, reach) in enumerate(placed):
        solid = _blob(rng, c, radius, aniso=0.1, wobble=0.05)
        if radius >= 7.0:
            inner = _scaled(solid, rng.uniform(0.4, 0.6), wobble=0.08)
            comps.append(Compartment("necrosis", inner, _necrosis_params(rng), BRATS_NECROSIS, lesion=n))
            patterns.append("ring")
        else:
            patterns.append("nodular")
        comps.append(Compartment("enhancing", solid, _enhancing_params(rng, (0.8, 1.1)), BRATS_ENHANCING, lesion=n))
        oedema = Blob(solid.centre, solid.radii * reach / radius, solid.rotation, _waves(rng, reach), 0.22)
        comps.append(Compartment("oedema", oedema, _oedema_params(rng), BRATS_OEDEMA, (0.15, 1.0, 0.0, 0.0), lesion=n))
        if radius > 8.0:
            masses.append(MassEffect(solid.centre, float(rng.uniform(0.1, 0.2)), 1.5 * radius))
    info = {"count": len(placed), "patterns": tuple(patterns),
            "pattern": "ring" if "ring" in patterns else "nodular"}
    return LesionPlan("metastasis", tuple(comps), tuple(masses), info)


_TERRITORIES = {
    # name: (apex fn(side, rng), axis fn(side, rng), half-angle deg range, inner range, outer range)
    "MCA": (lambda s, r: np.array([s * r.uniform(18, 26), r.uniform(-10, 5), r.uniform(0, 12)]),
            lambda s, r: np.array([s, r.uniform(-0.7, 0.7), r.uniform(-0.4, 0.6)]), (14, 28), (6, 15), (55, 90)),
    "ACA": (lambda s, r: np.array([s * 5.0, r.uniform(15, 25), r.uniform(5, 15)]),
            lambda s, r: np.array([s * 0.1, r.uniform(0.1, 0.6), 1.0]), (12, 20), (5, 10), (50, 80)),
    "PCA": (lambda s, r: np.array([s * r.uniform(12, 18), r.uniform(-40, -30), r.uniform(-2, 6)]),
            lambda s, r: np.array([s * r.uniform(0.1, 0.4), -1.0, r.uniform(-0.1, 0.3)]), (14, 24), (8, 15), (50, 80)),
}


def plan_stroke(rng: np.random.Generator, cands: Candidates) -> LesionPlan:
    """Acute infarct: a wedge in the MCA/ACA/PCA territory of one hemisphere; restricted diffusion."""
    side = int(rng.choice([-1, 1]))
    territory = str(rng.choice(["MCA", "ACA", "PCA"], p=[0.6, 0.15, 0.25]))
    apex_fn, axis_fn, half, inner, outer = _TERRITORIES[territory]
    apex = apex_fn(side, rng)
    axis = axis_fn(side, rng)
    axis = axis / np.linalg.norm(axis)
    wedge = Wedge(apex, axis, float(np.deg2rad(rng.uniform(*half))), float(rng.uniform(*inner)),
                  float(rng.uniform(*outer)), side, _waves(rng, 25.0), 0.1)
    params = TissueParams(rng.uniform(950, 1150), rng.uniform(110, 140), 0.88, rng.uniform(0.40, 0.55))
    # cytotoxic swelling effaces the sulci: the infarct also takes over half of the sulcal CSF
    comp = Compartment("infarct", wedge, params, ISLES_LESION, (1.0, 1.0, 0.5, 0.0))
    return LesionPlan("stroke", (comp,), (), {"territory": territory, "pattern": "none"})


def plan_wmh(rng: np.random.Generator, cands: Candidates) -> LesionPlan:
    """Periventricular and deep WM patches (Fazekas 1-3); sometimes a lacune (label 2)."""
    grade = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    count = int(rng.integers(*{1: (3, 7), 2: (6, 12), 3: (10, 17)}[grade]))
    rad = {1: (2.5, 4.0), 2: (3.0, 6.0), 3: (4.0, 8.5)}[grade]
    bilateral = bool(rng.random() < 0.8)
    side = int(rng.choice([-1, 1]))
    comps: list[Compartment] = []
    if rng.random() < 0.3:
        pool = cands.deep_wm if bilateral else cands.deep_wm[cands.deep_wm[:, 0] * side > 0]
        c = pool[rng.integers(len(pool))]
        lacune = TissueParams(rng.uniform(2000, 2400), rng.uniform(220, 300), 0.97, rng.uniform(2.4, 2.9))
        comps.append(Compartment("lacune", _blob(rng, c, rng.uniform(2.5, 4.0), wobble=0.05), lacune, WMH_OTHER))
    for n in range(count):
        pool = cands.periventricular if rng.random() < 0.7 else cands.deep_wm
        if not bilateral:
            pool = pool[pool[:, 0] * side > 0]
        c = pool[rng.integers(len(pool))]
        params = TissueParams(rng.uniform(800, 950), rng.uniform(110, 140), rng.uniform(0.84, 0.88),
                              rng.uniform(0.9, 1.2))
        blob = _blob(rng, c, rng.uniform(*rad), aniso=0.35, wobble=0.15)
        comps.append(Compartment("wmh", blob, params, WMH_LESION, (0.2, 1.0, 0.0, 0.0), lesion=n))
    info = {"grade": grade, "count": count, "pattern": "none", "lacune": comps[0].role == "lacune"}
    return LesionPlan("wmh", tuple(comps), (), info)


PLANNERS = {
    "glioma": plan_glioma,
    "meningioma": plan_meningioma,
    "metastasis": plan_metastasis,
    "stroke": plan_stroke,
    "wmh": plan_wmh,
}


def plan_lesions(disease: str, rng: np.random.Generator) -> LesionPlan:
    """Draw the pathology of one case of ``disease`` (one of the five classes); resolution-independent."""
    return PLANNERS[disease](rng, candidates())
