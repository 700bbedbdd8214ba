"""The one volume type and every NIfTI / orientation / resampling conversion.

Array convention (stated once, used everywhere): arrays are indexed ``[i, j, k]`` in
**RAS+** voxel order — ``i`` increases to the subject's Right, ``j`` to Anterior, ``k`` to
Superior — after :func:`to_canonical`. Axial slices are ``array[:, :, k]``. The affine maps
voxel indices to RAS+ world millimetres (NIfTI convention). SimpleITK uses LPS world
coordinates; the conversion lives in :func:`to_sitk` / :func:`from_sitk` only.
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

try:  # ISA-L's deflate (python-isal): the same gzip format, faster to write and read (`nifti_gzip` bench)
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # a platform without its wheels: the standard library (same data, other bytes)
    _igzip = _isal_zlib = None

from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import atomic_path

VolumeKind = Literal["intensity", "label"]

_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D image: ``array`` (float32 for intensities, int16 for labels) + 4x4 ``affine``.

    ``affine`` maps voxel index (i, j, k, 1) to RAS+ world millimetres.
    """

    array: np.ndarray
    affine: np.ndarray
    kind: VolumeKind = "intensity"
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"Volume needs a 3D array, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    def with_array(self, array: np.ndarray, kind: VolumeKind | None = None) -> Volume:
        return Volume(array, self.affine.copy(), kind or self.kind, dict(self.meta))

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned RAS bounding box (min, max) of the voxel centres, in mm."""
        corners = np.array(
            [[i, j, k, 1.0] for i in (0, self.shape[0] - 1) for j in (0, self.shape[1] - 1)
             for k in (0, self.shape[2] - 1)]
        )
        world = corners @ self.affine.T
        return world[:, :3].min(axis=0), world[:, :3].max(axis=0)


_DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (_isal_zlib.error,) if _isal_zlib is not None else ()
#: sizeof_hdr of NIfTI-1 / NIfTI-2 headers (first 4 bytes, either byte order)
_NIFTI_CLASSES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


def _read_nifti(path: Path):  # -> nibabel image
    """``nib.load``, except that a gzipped NIfTI-1/2 file is inflated in one call (ISA-L when
    installed) and parsed from memory: 1-mm volumes are read whole anyway, and nibabel's
    streaming gzip reader is the slow part of reading them."""
    if path.suffix.lower() != ".gz":
        return nib.load(str(path))
    raw = path.read_bytes()
    raw = _igzip.decompress(raw) if _igzip is not None else gzip.decompress(raw)
    klass = None
    if len(raw) >= 4:
        klass = _NIFTI_CLASSES.get(int.from_bytes(raw[:4], "little")) or _NIFTI_CLASSES.get(int.from_bytes(raw[:4], "big"))
    if klass is None:  # not NIfTI inside (Analyze, MGH, ...): nibabel finds out what it is
        return nib.load(str(path))
    holder = nib.FileHolder(filename=str(path), fileobj=io.BytesIO(raw))
    return klass.from_file_map({"image": holder, "header": holder})


def load_volume(path: str | Path, kind: VolumeKind = "intensity", allow_nonfinite: bool = False) -> Volume:
    """Read a 3D NIfTI file, validated. Bad files raise :class:`UserError` naming the file.

    A 4D file with a single volume (last axis 1) is squeezed; other 4D or 2D files, truncated
    or corrupt files, and NaN/Inf voxels (unless ``allow_nonfinite``) are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("file not found; check the path", str(path))
    try:
        img = _read_nifti(path)
        data = np.asarray(img.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError,
            *_DECOMPRESS_ERRORS) as exc:
        raise UserError(f"not a readable NIfTI file ({type(exc).__name__}: {exc}); re-export it", str(path)) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"expected a 3D volume, got {data.ndim}D with shape {data.shape}", str(path))
    if min(data.shape) < 1:
        raise UserError(f"empty volume with shape {data.shape}", str(path))
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise UserError("the header's affine is singular or non-finite; fix the header", str(path))
    if kind == "label":
        if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
            arr = data.astype(np.int16)  # what the float route below gives for integers, without it
        else:
            arr = np.rint(np.nan_to_num(data.astype(np.float64))).astype(np.int16)
    else:
        arr = data.astype(np.float32)
        if not allow_nonfinite and not np.all(np.isfinite(arr)):
            bad = int((~np.isfinite(arr)).sum())
            raise UserError(f"{bad} voxels are NaN or Inf; clean the image first", str(path))
    descrip = img.header.get("descrip") if hasattr(img, "header") else None
    meta = {"source": str(path)}
    if descrip is not None:
        meta["descrip"] = bytes(np.asarray(descrip)).decode("latin-1").strip("\x00 ")
    return Volume(arr, affine, kind, meta)


#: gzip settings of written ``.nii.gz`` files: level 1 (nibabel's default). With python-isal
#: installed (a dependency) ISA-L's level 1 compresses a 1-mm float volume 2.1x faster than zlib
#: and to half the size (`make bench`, `nifti_gzip`); without it, zlib with its run-length strategy (a skull-stripped volume
#: compresses almost only through its zero background, which RLE codes as well as LZ77 does in
#: half the time). Any gzip reader reads either; the header's mtime 0 keeps files reproducible.
GZIP_LEVEL = 1
GZIP_STRATEGY = zlib.Z_RLE


def _compressor():  # -> a zlib-style compress object writing one gzip member (header mtime 0)
    if _isal_zlib is not None:
        return _isal_zlib.compressobj(GZIP_LEVEL, _isal_zlib.DEFLATED, 16 + _isal_zlib.MAX_WBITS)
    return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, GZIP_STRATEGY)


class _GzipSink(io.RawIOBase):
    """A write-only stream that compresses what nibabel writes as it comes into ``out`` (a binary
    file), with the settings above, instead of collecting the whole uncompressed file in memory
    first; ``tell`` counts uncompressed bytes. :meth:`finish` writes the end of the gzip member."""

    def __init__(self, out) -> None:
        super().__init__()
        self._out, self._comp, self._pos = out, _compressor(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self._out.write(self._comp.compress(data))
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:  # nibabel seeks to where it already is
        if (whence, pos) not in ((io.SEEK_SET, self._pos), (io.SEEK_CUR, 0)):
            raise io.UnsupportedOperation("a compressing stream only writes forward")
        return self._pos

    def finish(self) -> None:
        self._out.write(self._comp.flush())


def save_volume(vol: Volume, path: str | Path, description: str | None = None) -> None:
    """Write ``vol`` as NIfTI-1 atomically. ``description`` goes into the header's descrip.

    ``.nii.gz`` files are compressed with :data:`GZIP_LEVEL` / :data:`GZIP_STRATEGY`.
    """
    arr = vol.array.astype(np.int16 if vol.kind == "label" else np.float32, copy=False)
    img = nib.Nifti1Image(arr, vol.affine)
    img.set_qform(vol.affine, code=1)
    img.set_sform(vol.affine, code=1)
    if description is not None:
        img.header["descrip"] = description.encode("latin-1", "replace")[:79]
    with atomic_path(path) as tmp:
        if str(path).endswith(".nii.gz"):
            with open(tmp, "wb") as fh:
                sink = _GzipSink(fh)
                img.to_file_map({"image": nib.FileHolder(fileobj=sink), "header": nib.FileHolder(fileobj=sink)})
                sink.finish()
        else:
            nib.save(img, str(tmp))


def to_canonical(vol: Volume) -> Volume:
    """Reorient (by axis permutation/flip only, no interpolation) to RAS+ voxel order."""
    img = nib.Nifti1Image(vol.array, vol.affine)
    can = nib.as_closest_canonical(img)
    return Volume(np.asarray(can.dataobj).astype(vol.array.dtype), can.affine, vol.kind, dict(vol.meta))


def to_sitk(vol: Volume):  # -> SimpleITK.Image
    """Convert to a SimpleITK image (LPS world, array axes reversed)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array.transpose(2, 1, 0)))
    lps = _LPS_FLIP @ vol.affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in lps[:3, 3]])
    img.SetDirection([float(d) for d in direction.flatten()])
    return img


def from_sitk(img, kind: VolumeKind = "intensity") -> Volume:
    """Convert a SimpleITK image back to a :class:`Volume` (RAS affine)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    spacing = np.array(img.GetSpacing())
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = img.GetOrigin()
    return Volume(arr, _LPS_FLIP @ lps, kind)


#: largest deviation (voxels) from a pure per-axis scale + half-voxel shift for which
#: :func:`resample_to` takes the torch path (grids written by this toolkit agree to ~1e-12)
_ALIGNED_ATOL = 1e-6


def _axis_aligned_scales(src_affine: np.ndarray, src_shape: tuple[int, ...], shape: tuple[int, int, int],
                         affine: np.ndarray) -> list[float] | None:
    """Per-axis scale factors when the grid (``shape``, ``affine``) samples the source grid as
    ``torch.nn.functional.interpolate(..., align_corners=False)`` does, else None.

    That is: source index ``(i + 0.5) * a - 0.5`` along every axis (no rotation or flip, voxel
    corners aligned: what :func:`resample_spacing` makes, and every modality of a case acquired
    on one grid), with every output voxel inside the source image, so that SimpleITK's linear
    interpolator and torch's trilinear one compute the same weights of the same neighbours.
    """
    m = np.linalg.solve(np.asarray(src_affine, dtype=np.float64), np.asarray(affine, dtype=np.float64))
    lin, off = m[:3, :3], m[:3, 3]
    a = np.diag(lin).copy()
    if np.abs(lin - np.diag(a)).max() > _ALIGNED_ATOL or np.any(a <= _ALIGNED_ATOL):
        return None
    if np.abs(off - (0.5 * a - 0.5)).max() > _ALIGNED_ATOL:
        return None
    scales = [float(1.0 / x) for x in a]
    # torch's output size is floor(n * scale); the first `shape` voxels of it are the ones wanted
    if any(np.floor(n * s) < out for n, s, out in zip(src_shape, scales, shape)):
        return None
    return scales


def _interpolate_linear(array: np.ndarray, shape: tuple[int, int, int], scales: list[float]) -> np.ndarray:
    """Trilinear resampling of ``array`` by ``scales`` (see :func:`_axis_aligned_scales`) to float32.

    In float64, like ITK's interpolator: float32 source coordinates would move the weights by
    up to 4e-6 of a voxel at index 47 (values off by 6e-6 of their range) and give voxels that
    ITK leaves at exactly 0 a tiny value, which the brain mask (nonzero union) would take in.
    """
    import torch

    with torch.no_grad():  # in (k, j, i) order: a loaded volume is Fortran-ordered, and so is the result
        x = torch.from_numpy(array.T).to(torch.float64)[None, None]
        y = torch.nn.functional.interpolate(x, scale_factor=scales[::-1], mode="trilinear", align_corners=False,
                                            recompute_scale_factor=False)
        return y[0, 0, : shape[2], : shape[1], : shape[0]].to(torch.float32).contiguous().numpy().T


def resample_to(vol: Volume, shape: tuple[int, int, int], affine: np.ndarray, default: float = 0.0) -> Volume:
    """Resample ``vol`` onto the grid (``shape``, ``affine``) in physical space.

    Linear interpolation for intensities, nearest neighbour for labels. The output grid is
    passed to SimpleITK as size/origin/spacing/direction (no reference image is allocated).
    An intensity volume whose grid maps onto the output grid by a per-axis scale with aligned
    voxel corners (a change of spacing; :func:`_axis_aligned_scales`) is interpolated by torch
    instead, in float64 like ITK: the same float32 values but for rare 1-ulp roundings (test_io),
    1.4x faster on one core (`make bench`, ``resample``) and without ITK's thread pool, which
    oversubscribed ``prepare``'s workers (the demo's ``prepare`` 1.3-1.5x faster; README).
    """
    label = vol.kind == "label"
    src_array = vol.array if label else vol.array.astype(np.float32, copy=False)
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    scales = None if label else _axis_aligned_scales(vol.affine, vol.shape, shape, affine)
    if scales is not None:
        return Volume(_interpolate_linear(src_array, shape, scales), np.asarray(affine, dtype=np.float64),
                      vol.kind, dict(vol.meta))
    return _resample_sitk(vol.with_array(src_array), shape, affine, default)


def _resample_sitk(vol: Volume, shape: tuple[int, int, int], affine: np.ndarray, default: float = 0.0) -> Volume:
    """:func:`resample_to` by SimpleITK, for any grid (``vol.array`` already float32 or int16)."""
    import SimpleITK as sitk

    label = vol.kind == "label"
    grid = _LPS_FLIP @ np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((grid[:3, :3] ** 2).sum(axis=0))
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    src = to_sitk(vol)
    out = sitk.Resample(src, [int(s) for s in shape], sitk.Transform(), interp, [float(o) for o in grid[:3, 3]],
                        [float(s) for s in spacing], [float(d) for d in (grid[:3, :3] / spacing).flatten()],
                        default, src.GetPixelID())
    res = from_sitk(out, vol.kind)
    res.affine = np.asarray(affine, dtype=np.float64)
    res.meta = dict(vol.meta)
    return res


def resample_spacing(vol: Volume, spacing: tuple[float, float, float]) -> Volume:
    """Resample to new voxel ``spacing`` (mm) keeping orientation and physical extent."""
    old = np.array(vol.spacing)
    new = np.asarray(spacing, dtype=np.float64)
    shape = tuple(max(1, int(round(n * o / s))) for n, o, s in zip(vol.shape, old, new))
    direction = vol.affine[:3, :3] / old
    affine = np.eye(4)
    affine[:3, :3] = direction * new
    # keep the centre of the first voxel's corner aligned: shift by half the size change
    corner = vol.affine[:3, 3] - direction @ (old / 2)
    affine[:3, 3] = corner + direction @ (new / 2)
    return resample_to(vol, shape, affine)  # type: ignore[arg-type]


def extents_overlap(a: Volume, b: Volume) -> bool:
    """True when the RAS bounding boxes of two volumes intersect."""
    amin, amax = a.world_bounds()
    bmin, bmax = b.world_bounds()
    return bool(np.all(amin <= bmax) and np.all(bmin <= amax))
