"""The volume type: NIfTI round trips, orientation, resampling and validated loading."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import atomic_dir, write_text
from unibrain_cli.io.volume import (
    Volume,
    extents_overlap,
    from_sitk,
    load_volume,
    resample_spacing,
    resample_to,
    save_volume,
    to_canonical,
    to_sitk,
)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _vol(affine, shape=(6, 7, 5)):
    arr = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return Volume(arr, affine)


def test_save_load_round_trip(tmp_path):
    vol = _vol(np.diag([0.9, 1.1, 3.0, 1.0]))
    save_volume(vol, tmp_path / "a.nii.gz", description="synthetic")
    back = load_volume(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine)
    assert back.meta["descrip"] == "synthetic"
    assert not list(tmp_path.glob(".*tmp*"))


def test_gzipped_files_are_plain_gzip_reproducible_and_read_like_nibabel(tmp_path):
    rng = np.random.default_rng(0)
    arr = np.where(rng.random((20, 18, 9)) < 0.6, 0.0, rng.random((20, 18, 9))).astype(np.float32)
    vol = Volume(arr, np.diag([1.0, 1.2, 2.0, 1.0]))
    save_volume(vol, tmp_path / "a.nii.gz")
    save_volume(vol, tmp_path / "b.nii.gz")
    data = (tmp_path / "a.nii.gz").read_bytes()
    assert data == (tmp_path / "b.nii.gz").read_bytes()  # mtime 0: the same bytes every time
    # any gzip reader inflates it to the NIfTI that nibabel writes uncompressed
    save_volume(vol, tmp_path / "a.nii")
    assert gzip.decompress(data) == (tmp_path / "a.nii").read_bytes()
    # files from other writers (nibabel's zlib, NIfTI-2, big-endian) read as nibabel reads them
    for name, img in [
        ("nib.nii.gz", nib.Nifti1Image(arr * 3 - 1, np.diag([2.0, 1.0, 1.0, 1.0]))),
        ("two.nii.gz", nib.Nifti2Image(arr, np.eye(4))),
        ("big.nii.gz", nib.Nifti1Image(arr.astype(">f4"), np.eye(4), nib.Nifti1Header(endianness=">"))),
        ("int.nii.gz", nib.Nifti1Image(np.rint(arr * 100).astype(np.int16), np.eye(4))),
    ]:
        nib.save(img, tmp_path / name)
        ref = nib.load(tmp_path / name)
        got = load_volume(tmp_path / name)
        np.testing.assert_array_equal(got.array, np.asarray(ref.dataobj, dtype=np.float32), err_msg=name)
        np.testing.assert_allclose(got.affine, ref.affine)


def test_without_isal_the_standard_library_writes_and_reads_the_same_data(tmp_path, monkeypatch):
    from unibrain_cli.io import volume as volume_mod

    vol = _vol(np.diag([1.0, 1.0, 2.0, 1.0]))
    save_volume(vol, tmp_path / "isal.nii.gz")
    monkeypatch.setattr(volume_mod, "_igzip", None)
    monkeypatch.setattr(volume_mod, "_isal_zlib", None)
    save_volume(vol, tmp_path / "zlib.nii.gz")
    assert gzip.decompress((tmp_path / "zlib.nii.gz").read_bytes()) == gzip.decompress(
        (tmp_path / "isal.nii.gz").read_bytes())
    for name in ("isal.nii.gz", "zlib.nii.gz"):
        np.testing.assert_array_equal(load_volume(tmp_path / name).array, vol.array)
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes((tmp_path / "zlib.nii.gz").read_bytes()[:60])
    with pytest.raises(UserError, match="trunc.nii.gz"):
        load_volume(trunc)


def test_canonical_reorients_lps_to_ras_without_moving_voxels():
    vol = _vol(LPS @ np.diag([1.0, 2.0, 3.0, 1.0]))
    can = to_canonical(vol)
    assert nib.aff2axcodes(can.affine) == ("R", "A", "S")
    # every voxel keeps its world position
    i, j, k = 1, 2, 3
    world = vol.affine @ [i, j, k, 1]
    idx = np.rint(np.linalg.inv(can.affine) @ world).astype(int)[:3]
    assert can.array[tuple(idx)] == vol.array[i, j, k]


def test_sitk_round_trip_preserves_geometry():
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.2, 2.5])
    aff[:3, 3] = [10, -20, 5]
    vol = _vol(aff)
    back = from_sitk(to_sitk(vol))
    np.testing.assert_allclose(back.affine, aff, atol=1e-6)
    np.testing.assert_array_equal(back.array, vol.array)


def test_resample_to_own_grid_is_identity_and_spacing_keeps_extent():
    vol = _vol(np.diag([1.0, 1.0, 2.0, 1.0]), shape=(8, 8, 6))
    same = resample_to(vol, vol.shape, vol.affine)
    np.testing.assert_allclose(same.array, vol.array, atol=1e-4)
    fine = resample_spacing(vol, (1.0, 1.0, 1.0))
    assert fine.shape == (8, 8, 12)
    assert fine.spacing == pytest.approx((1.0, 1.0, 1.0))


@pytest.mark.parametrize("spacing,shape,target", [
    ((2.0, 2.0, 2.0), (13, 11, 9), (1.0, 1.0, 1.0)),  # the demo's 2-mm phantom to 1 mm
    ((1.0, 1.0, 1.0), (14, 12, 10), (2.0, 2.0, 2.0)),  # downsampling
    ((0.9, 1.1, 3.0), (17, 12, 7), (1.0, 1.0, 1.0)),  # anisotropic, sizes rounded (output ends early)
])
def test_resampling_by_torch_matches_simpleitk_on_aligned_grids(spacing, shape, target):
    """The torch path of resample_to (per-axis scale, aligned voxel corners) gives SimpleITK's
    linear interpolation, edges included, and is taken for exactly these grids."""
    from unibrain_cli.io.volume import _axis_aligned_scales, _resample_sitk

    rng = np.random.default_rng(3)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-40.0, 12.5, 3.0]
    vol = Volume(rng.random(shape, dtype=np.float32) * 100, aff)
    fine = resample_spacing(vol, target)
    assert _axis_aligned_scales(vol.affine, vol.shape, fine.shape, fine.affine) is not None
    ref = _resample_sitk(vol, fine.shape, fine.affine)
    assert fine.array.dtype == np.float32 and fine.shape == ref.shape
    np.testing.assert_allclose(fine.array, ref.array, rtol=0, atol=1e-4)  # float32 rounding of values ~100
    # a sibling modality on the same source grid goes the same way onto the new grid
    other = resample_to(vol.with_array(vol.array[::-1].copy()), fine.shape, fine.affine)
    np.testing.assert_allclose(other.array, _resample_sitk(vol.with_array(vol.array[::-1].copy()), fine.shape,
                                                           fine.affine).array, rtol=0, atol=1e-4)


def test_resampling_falls_back_to_simpleitk_off_the_aligned_grids():
    from unibrain_cli.io.volume import _axis_aligned_scales

    rng = np.random.default_rng(4)
    vol = Volume(rng.random((10, 9, 8), dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    fine = resample_spacing(vol, (1.0, 1.0, 1.0))
    shifted = fine.affine.copy()
    shifted[:3, 3] += 0.3  # not corner-aligned
    rot = np.eye(4)
    rot[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    for shape, aff in [(fine.shape, shifted), (fine.shape, rot @ fine.affine),
                       ((fine.shape[0] + 3, *fine.shape[1:]), fine.affine)]:  # reaches outside: background
        assert _axis_aligned_scales(vol.affine, vol.shape, shape, aff) is None
    out = resample_to(vol, (fine.shape[0] + 3, *fine.shape[1:]), fine.affine)
    assert np.all(out.array[-2:] == 0) and out.array[:-3].any()
    assert _axis_aligned_scales(vol.affine, vol.shape, (5, 5, 5), vol.affine) == [1.0, 1.0, 1.0]
    labels = Volume(rng.integers(0, 4, (10, 9, 8)).astype(np.int16), vol.affine, "label")
    assert resample_to(labels, fine.shape, fine.affine).array.dtype == np.int16  # nearest neighbour, by ITK


@pytest.mark.parametrize("kind", ["intensity", "label"])
def test_save_volume_streams_what_nibabel_writes(tmp_path, kind):
    """save_volume compresses nibabel's own serialisation as it is written: the file inflates to
    exactly ``Nifti1Image.to_bytes()`` (header, extension flag, data in Fortran order)."""
    rng = np.random.default_rng(5)
    arr = rng.random((9, 8, 7), dtype=np.float32)
    if kind == "label":
        arr = (arr * 5).astype(np.int16)
    aff = np.diag([1.0, 1.2, 2.0, 1.0])
    aff[:3, 3] = [3.0, -4.0, 5.0]
    for order in ("C", "F"):
        vol = Volume(np.asarray(arr, order=order), aff, kind)  # type: ignore[arg-type]
        path = tmp_path / f"v{order}.nii.gz"
        save_volume(vol, path, description="unibrain test")
        img = nib.Nifti1Image(vol.array, aff)
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
        img.header["descrip"] = b"unibrain test"
        assert gzip.decompress(path.read_bytes()) == img.to_bytes()
        np.testing.assert_array_equal(load_volume(path, kind=kind).array, vol.array)  # type: ignore[arg-type]


def test_extents_overlap():
    a = _vol(np.eye(4))
    far = np.eye(4)
    far[:3, 3] = 500
    assert extents_overlap(a, a) and not extents_overlap(a, _vol(far))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_volume(tmp_path / "missing.nii.gz")
    good = tmp_path / "good.nii.gz"
    save_volume(_vol(np.eye(4)), good)
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(UserError, match="trunc.nii.gz"):
        load_volume(trunc)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(UserError, match="junk.nii.gz"):
        load_volume(junk)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "four.nii.gz")
    with pytest.raises(UserError, match="3D"):
        load_volume(tmp_path / "four.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "two.nii.gz")
    with pytest.raises(UserError, match="3D"):
        load_volume(tmp_path / "two.nii.gz")
    arr = np.ones((4, 4, 4), np.float32)
    arr[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(UserError, match="NaN"):
        load_volume(tmp_path / "nan.nii.gz")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        write_text(tmp / "half.txt", "x")
        raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        write_text(tmp / "full.txt", "x")
    assert (target / "full.txt").read_text() == "x"


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            write_text(tmp / "b.txt", "y")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
