"""Phantom anatomy: the MNI152 2009a templates shipped in nilearn's wheel, subject warps, lobes.

Coordinates: *MNI* points are RAS+ millimetres in MNI152 space; *world* points are RAS+
millimetres in a subject's scanner space (what a NIfTI affine maps voxel indices to). A
:class:`SubjectWarp` maps world -> MNI (the "pull-back" used to sample template maps on a
subject grid): a small rotation, anisotropic scaling and translation plus a smooth elastic
displacement (a low-order sine basis, a few mm).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Tissue names in the order of :attr:`Template.maps`.
TISSUES: tuple[str, ...] = ("gm", "wm", "csf")
LOBES: tuple[str, ...] = ("frontal", "parietal", "temporal", "occipital", "cerebellum")


@dataclass(frozen=True)
class Template:
    """MNI152 2009a tissue probability maps at ``resolution`` mm.

    ``maps``: float32 (3, X, Y, Z) GM, WM, CSF probabilities (CSF = brain mask - GM - WM,
    clipped to [0, 1]); ``affine``: voxel -> MNI mm (axis-aligned, RAS+);
    ``support``: bool (X, Y, Z), voxels within one voxel of any tissue (where samples can be > 0);
    ``brain_lo`` / ``brain_hi``: MNI bounding box (mm) of the brain mask.
    """

    resolution: int
    maps: np.ndarray
    affine: np.ndarray
    support: np.ndarray
    brain_lo: np.ndarray
    brain_hi: np.ndarray

    @property
    def spacing(self) -> float:
        return float(self.affine[0, 0])

    def voxel_to_mni(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 3) MNI mm."""
        return ijk * np.diag(self.affine)[:3] + self.affine[:3, 3]

    def mni_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) MNI mm -> (N, 3) fractional voxel indices."""
        return (xyz - self.affine[:3, 3]) / np.diag(self.affine)[:3]


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Average ``f``x``f``x``f`` blocks of a 3D array (zero-padded to a multiple of ``f``)."""
    pad = [(0, (-n) % f) for n in a.shape]
    a = np.pad(a, pad)
    x, y, z = (n // f for n in a.shape)
    return a.reshape(x, f, y, f, z, f).mean(axis=(1, 3, 5), dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _template_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, brain mask (float32, 197x233x189) and affine of nilearn's 1 mm MNI152 2009a maps."""
    from nilearn import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm_img = datasets.load_mni152_gm_template(resolution=1)
        wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
        mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), np.float32)
    return np.asarray(gm_img.get_fdata(), np.float32), wm, mask, np.asarray(gm_img.affine, np.float64)


@functools.lru_cache(maxsize=2)
def load_template(resolution: int) -> Template:
    """The MNI152 2009a maps (shipped in nilearn's wheel; no download) at 1 or 2 mm, once per process.

    The 2 mm maps are 2x2x2 block means of the 1 mm maps (exact partial volumes).
    """
    gm, wm, mask, affine = _template_1mm()
    mask = (mask > 0.5).astype(np.float32)
    gm = np.clip(gm, 0.0, 1.0) * mask
    wm = np.clip(wm, 0.0, 1.0) * mask
    over = np.maximum(gm + wm, 1.0)
    gm, wm = gm / over, wm / over
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    if resolution != 1:
        f = int(resolution)
        gm, wm, csf, mask = (_block_mean(a, f) for a in (gm, wm, csf, mask))
        affine = affine.copy()
        affine[:3, 3] += (f - 1) / 2.0 * np.diag(affine)[:3]
        affine[:3, :3] *= f
    inside = mask >= 0.5
    support = ndi.binary_dilation((gm + wm + csf) > 0, structure=np.ones((3, 3, 3), bool))
    idx = np.argwhere(inside)
    lo = idx.min(0) * np.diag(affine)[:3] + affine[:3, 3]
    hi = idx.max(0) * np.diag(affine)[:3] + affine[:3, 3]
    return Template(resolution, np.stack([gm, wm, csf]), affine, support, lo, hi)


@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid: ``shape`` and a 4x4 voxel -> world (RAS+ mm) ``affine``.

    The affine's 3x3 part must be diagonal (signs may be negative, as in BraTS' LPS-like files).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        lin = np.asarray(self.affine)[:3, :3]
        if np.abs(lin - np.diag(np.diag(lin))).max() > 1e-9:
            raise ValueError("phantom grids must be axis-aligned (diagonal affine)")

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k (positive)."""
        return np.abs(np.diag(self.affine)[:3])

    @property
    def centre(self) -> np.ndarray:
        """World position (mm) of the grid's centre."""
        return self.affine[:3, :3] @ ((np.array(self.shape) - 1) / 2.0) + self.affine[:3, 3]

    def axis_world(self, axis: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """World coordinate (mm, float64) of indices ``start:stop`` along ``axis``."""
        stop = self.shape[axis] if stop is None else stop
        return np.arange(start, stop, dtype=np.float64) * self.affine[axis, axis] + self.affine[axis, 3]

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) fractional voxel indices."""
        return (xyz - self.affine[:3, 3]) / np.diag(self.affine)[:3]

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 3) world mm."""
        return ijk * np.diag(self.affine)[:3] + self.affine[:3, 3]


def centred_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Grid:
    """RAS+ grid of ``shape`` and ``spacing`` (mm) whose centre lies at world ``centre``."""
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    affine[:3, 3] = np.asarray(centre) - np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return Grid(tuple(int(s) for s in shape), affine)  # type: ignore[arg-type]


Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class SubjectWarp:
    """World -> MNI map of one subject: ``mni = centre_mni + matrix @ (w - origin) + u(w - origin)``.

    ``matrix`` (3x3) holds rotation and inverse scaling; ``coeffs`` (3, K, K, K) are the
    elastic displacement's sine-basis coefficients in mm over the cube ``[-half, half]^3`` mm.
    """

    origin: np.ndarray
    centre_mni: np.ndarray
    matrix: np.ndarray
    coeffs: np.ndarray
    half: float = 120.0

    def _basis(self, s: np.ndarray) -> np.ndarray:
        """(n,) offsets in mm -> (n, K) basis values sin(pi a (s + half) / (2 half)), a = 1..K."""
        k = self.coeffs.shape[1]
        t = (np.clip(s, -self.half, self.half) + self.half) / (2 * self.half)
        return np.sin(np.pi * np.outer(t, np.arange(1, k + 1)))

    def to_mni(self, world: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) MNI mm (exact, including the elastic part)."""
        rel = np.atleast_2d(world) - self.origin
        out = self.centre_mni + rel @ self.matrix.T
        bx, by, bz = (self._basis(rel[:, d]) for d in range(3))
        for d in range(3):
            out[:, d] += np.einsum("abc,na,nb,nc->n", self.coeffs[d], bx, by, bz)
        return out

    def grid_to_mni(self, grid: Grid, box: Box) -> np.ndarray:
        """MNI coordinates (float32, shape (3, *box shape)) of every voxel of ``grid[box]``."""
        axes = [grid.axis_world(a, box[a].start, box[a].stop) - self.origin[a] for a in range(3)]
        shape = tuple(len(a) for a in axes)
        bases = [self._basis(a) for a in axes]
        out = np.empty((3, *shape), np.float32)
        for d in range(3):
            lin = (self.centre_mni[d] + self.matrix[d, 0] * axes[0][:, None, None]
                   + self.matrix[d, 1] * axes[1][None, :, None] + self.matrix[d, 2] * axes[2][None, None, :])
            # separable contraction of the sine basis: c[abc] Bx[ia] By[jb] Bz[kc]
            t = np.tensordot(self.coeffs[d], bases[2], axes=([2], [1]))  # (a, b, k)
            t = np.tensordot(t, bases[1], axes=([1], [1]))  # (a, k, j)
            t = np.tensordot(bases[0], t, axes=([1], [0]))  # (i, k, j)
            out[d] = lin + t.transpose(0, 2, 1)
        return out

    def box_for(self, grid: Grid, mni_lo: np.ndarray, mni_hi: np.ndarray, margin: float) -> Box:
        """Index box of ``grid`` that covers the MNI box [lo, hi] plus ``margin`` mm (affine approx.)."""
        inv = np.linalg.inv(self.matrix)
        corners = np.array([[x, y, z] for x in (mni_lo[0], mni_hi[0]) for y in (mni_lo[1], mni_hi[1])
                            for z in (mni_lo[2], mni_hi[2])])
        world = (corners - self.centre_mni) @ inv.T + self.origin
        idx = grid.world_to_index(world)
        pad = margin / grid.spacing
        lo = np.floor(idx.min(0) - pad).astype(int)
        hi = np.ceil(idx.max(0) + pad).astype(int) + 1
        lo = np.clip(lo, 0, grid.shape)
        hi = np.clip(hi, 0, grid.shape)
        return tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))  # type: ignore[return-value]


def random_warp(rng: np.random.Generator, origin: np.ndarray, template: Template,
                max_rotation_deg: float = 5.0, scale_range: float = 0.06, elastic_mm: float = 2.5,
                n_basis: int = 3) -> SubjectWarp:
    """Draw a subject warp: rotation (normal, clipped), per-axis scaling, translation, elastic field.

    ``elastic_mm`` is the approximate standard deviation of the elastic displacement in mm.
    """
    angles = np.deg2rad(np.clip(rng.normal(0.0, max_rotation_deg / 2, 3), -max_rotation_deg, max_rotation_deg))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scale = rng.uniform(1.0 - scale_range, 1.0 + scale_range, 3)
    matrix = (rz @ ry @ rx) @ np.diag(1.0 / scale)
    centre = (template.brain_lo + template.brain_hi) / 2.0 + rng.normal(0.0, 2.0, 3)
    # field variance = n^3 * sigma_c^2 / 8 for a sine basis -> sigma_c for the requested std
    sigma_c = elastic_mm / np.sqrt(n_basis**3 / 8.0)
    coeffs = rng.normal(0.0, sigma_c, (3, n_basis, n_basis, n_basis))
    return SubjectWarp(np.asarray(origin, np.float64), centre, matrix, coeffs)


def sample_tissues(template: Template, mni: np.ndarray) -> np.ndarray:
    """Trilinear samples of the GM, WM, CSF maps at MNI points ``mni`` (3, ...) -> float32 (3, ...).

    Only points whose nearest template voxel is in ``template.support`` are interpolated (the
    rest are exactly 0), which skips the empty part of a field of view.
    """
    lin = np.diag(template.affine)[:3].astype(np.float32)
    off = template.affine[:3, 3].astype(np.float32)
    shape = template.support.shape
    flat = np.zeros(mni.shape[1:], np.int64)
    valid = np.ones(mni.shape[1:], bool)
    coords = np.empty(mni.shape, np.float32)
    for a in range(3):
        coords[a] = (mni[a] - off[a]) / lin[a]
        near = np.rint(coords[a]).astype(np.int64)
        valid &= (near >= 0) & (near < shape[a])
        flat = flat * shape[a] + np.clip(near, 0, shape[a] - 1)
    sel = valid & template.support.ravel()[flat]
    del flat, valid
    pts = coords[:, sel]
    out = np.zeros((3, *mni.shape[1:]), np.float32)
    for t in range(3):
        out[t][sel] = ndi.map_coordinates(template.maps[t], pts, order=1, mode="constant", cval=0.0,
                                          output=np.float32)
    return out


def tentorium_z(y: np.ndarray) -> np.ndarray:
    """Approximate MNI z (mm) of the tentorium at MNI y: cerebellum lies below it (for y < -40)."""
    return -12.0 + 0.2 * (np.asarray(y) + 40.0)


def lobe_at(mni: np.ndarray) -> np.ndarray:
    """Lobe name for each MNI point (N, 3) -> (N,) str array, from approximate landmark planes.

    cerebellum: below the tentorium behind y = -40; occipital: y < -72; temporal: below the
    Sylvian plane z < -0.25 (y + 10) (max 15), lateral (|x| > 25) or deep (z < -10), y < 25;
    frontal: in front of the central-sulcus plane y > -5 - 0.5 (z - 20) (capped at -5);
    parietal: the rest.
    """
    mni = np.atleast_2d(mni)
    x, y, z = mni[:, 0], mni[:, 1], mni[:, 2]
    sylvian = np.minimum(-0.25 * (y + 10.0), 15.0)
    central = np.minimum(-5.0 - 0.5 * (z - 20.0), -5.0)
    code = np.where(y > central, 0, 1)  # frontal / parietal
    code[(z < sylvian) & ((np.abs(x) > 25.0) | (z < -10.0)) & (y < 25.0)] = 2
    code[y < -72.0] = 3
    code[(y < -40.0) & (z < tentorium_z(y))] = 4
    return np.asarray(LOBES)[code]


def hemisphere_at(mni: np.ndarray) -> np.ndarray:
    """'left' (MNI x < 0) or 'right' for each MNI point (N, 3)."""
    return np.where(np.atleast_2d(mni)[:, 0] < 0.0, "left", "right")
