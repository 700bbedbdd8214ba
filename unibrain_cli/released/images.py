"""Images in the released protocol: LPI slices, uint8 intensities, padding, encoder inputs, outputs.

Their data preparation (``scripts/prepare_parquet_subjectwise.py``) reorients every volume to
LPI (``sitk.DICOMOrient(img, "LPI")``: x to the subject's Left, y Posterior, z Inferior) and
resamples it in-plane to 1 mm; slices are ``array[z]`` of SimpleITK's [z, y, x] array, so a slice
is [y, x] with row 0 anterior and column 0 the subject's RIGHT (radiological view). Our volumes
are RAS+ [i, j, k] (:mod:`unibrain_cli.io.volume`) on the 1 mm grid of
:func:`unibrain_cli.inference.inputs.load_case`; :func:`lpi_slice` gives exactly that view.

Per slice (``evaluate_metrics.py``):

1. intensities of the WHOLE volume: 0.5 / 99.5 percentiles of the voxels > 0 ->
   ``round((v - lo) / (hi - lo) * 255)`` clipped to [1, 255], other voxels 0, uint8
   (:func:`rescale_to_uint8`);
2. the slice centred and zero-padded to 256 x 256 (:func:`pad_to_target`; not padded when its
   height already reaches 256), three identical channels;
3. VAE input: BAGEL's resize rule (max 512, min 256, stride 16; 256 stays 256), [-1, 1];
   ViT input: the rule (max 980, min 224, stride 14) -> 252 x 252, PIL bicubic, [-1, 1];
4. a decoded image is ``(x * 0.5 + 0.5).clamp(0, 1) * 255`` truncated to uint8 RGB; outputs are
   the channel mean (truncated) centre-cropped back to the slice size (:func:`output_slice`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from unibrain_cli.errors import UserError
from unibrain_cli.inference.inputs import CaseVolumes, InputSpec, select_slices
from unibrain_cli.io.volume import load_volume, resample_to, to_canonical
from unibrain_cli.released.protocol import PAD_SIZE, PERCENTILES, VAE_RESIZE, VIT_RESIZE, ResizeRule

# ---------------------------------------------------------------------------------------------
# volumes and slices
# ---------------------------------------------------------------------------------------------


def raw_volumes(spec: InputSpec, case: CaseVolumes) -> dict[str, np.ndarray]:
    """Each input's own intensities on the case's 1 mm RAS+ grid (float32 [X, Y, Z]).

    ``load_case`` normalises inside the brain for our protocol; the released protocol maps the
    raw scanner intensities instead, so the files are read again and resampled (linear) onto the
    same grid. A prepared case has only its normalised [0, 1] volumes: those are used.
    """
    if spec.prepared is not None:
        return {m: np.asarray(v, dtype=np.float32) for m, v in case.volumes.items()}
    out: dict[str, np.ndarray] = {}
    for m, path in spec.files.items():
        vol = to_canonical(load_volume(path))
        if vol.shape == case.shape and np.allclose(vol.affine, case.affine, atol=1e-5):
            out[m] = vol.array.astype(np.float32)
        else:
            out[m] = resample_to(vol, case.shape, case.affine).array.astype(np.float32)
    return out


def rescale_to_uint8(volume: np.ndarray, where: str | None = None) -> np.ndarray:
    """Their ``rescale_intensity(norm=False)`` + uint8: voxels > 0 -> [1, 255] by the 0.5 / 99.5
    percentiles of the voxels > 0; every other voxel 0. UserError for an empty or constant image."""
    vol = np.asarray(volume, dtype=np.float32)
    positive = vol > 0
    if not positive.any():
        raise UserError("no voxel above 0; the released protocol maps the positive voxels to 1-255", where)
    obj = vol[positive]
    lo, hi = np.percentile(obj, PERCENTILES)
    if not hi > lo:
        raise UserError(f"constant intensity {lo:g} over the positive voxels; the image holds no usable signal", where)
    mapped = np.clip(np.round((obj - lo) / (hi - lo) * 255), 1, 255)
    out = np.zeros(vol.shape, dtype=np.uint8)
    out[positive] = mapped.astype(np.uint8)
    return out


def lpi_slice(volume: np.ndarray, k: int) -> np.ndarray:
    """RAS+ volume [X, Y, Z] -> the LPI axial slice [Y, X]: row 0 anterior, column 0 the subject's right."""
    return np.ascontiguousarray(np.asarray(volume)[::-1, ::-1, k].T)


def lpi_unslice(plane: np.ndarray) -> np.ndarray:
    """Inverse of :func:`lpi_slice`: slice [Y, X] -> ``volume[:, :, k]`` plane [X, Y]."""
    return np.ascontiguousarray(np.asarray(plane).T[::-1, ::-1])


def released_slices(case: CaseVolumes, mode: str | int) -> list[int]:
    """Axial indices to process, the representative one first.

    ``lesion`` with a known lesion mask: their middle lesion slice, ``z[len(z) // 2]`` over the
    LPI z indices (z runs inferior-wards, the reverse of our k). Otherwise as ``impute``
    (:func:`unibrain_cli.inference.inputs.select_slices`).
    """
    if mode == "lesion" and case.lesion is not None and case.lesion.any():
        ks = sorted((int(k) for k in np.flatnonzero(case.lesion.reshape(-1, case.shape[2]).any(axis=0))), reverse=True)
        return [ks[len(ks) // 2]]
    return select_slices(case.brain, case.lesion, mode)


# ---------------------------------------------------------------------------------------------
# 2D geometry
# ---------------------------------------------------------------------------------------------


def pad_to_target(image: np.ndarray, size: int = PAD_SIZE) -> np.ndarray:
    """Their ``pad_to_target(img, (size, size))``: centred zero padding [h, w] -> [size, size].

    Exactly their rule: nothing happens when ``h >= size`` (whatever the width). Where their
    code would fail (``h < size < w``), the width is kept and only the height padded.
    """
    h, w = image.shape[:2]
    if size <= h:
        return image
    width = max(size, w)
    out = np.zeros((size, width, *image.shape[2:]), dtype=image.dtype)
    top, left = (size - h) // 2, (width - w) // 2
    out[top:top + h, left:left + w] = image
    return out


def crop_to_target(image: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    """Their ``crop_to_target``: centre crop to ``target_hw`` unless a target side is not smaller."""
    h, w = image.shape[:2]
    th, tw = target_hw
    if th >= h or tw >= w:
        return image
    top, left = (h - th) // 2, (w - tw) // 2
    return image[top:top + th, left:left + tw]


def _divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _scaled(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _divisible(round(width * scale), stride), _divisible(round(height * scale), stride)


def resize_hw(height: int, width: int, rule: ResizeRule) -> tuple[int, int]:
    """(height, width) after BAGEL's ``MaxLongEdgeMinShortEdgeResize`` (one image)."""
    scale = min(rule.max_size / max(width, height), 1.0)
    scale = max(scale, rule.min_size / min(width, height))
    w, h = _scaled(width, height, scale, rule.stride)
    if w * h > rule.max_pixels:
        w, h = _scaled(w, h, rule.max_pixels / (w * h), rule.stride)
    if max(w, h) > rule.max_size:
        w, h = _scaled(w, h, rule.max_size / max(w, h), rule.stride)
    return h, w


def resize_rgb(rgb: np.ndarray, rule: ResizeRule) -> np.ndarray:
    """Apply the resize rule to an RGB uint8 image [H, W, 3] (PIL bicubic; same size: unchanged)."""
    h, w = resize_hw(rgb.shape[0], rgb.shape[1], rule)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.BICUBIC))


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> three identical channels [H, W, 3]."""
    return np.repeat(np.asarray(gray, dtype=np.uint8)[..., None], 3, axis=-1)


def slice_rgb(volume_u8: np.ndarray, k: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(padded RGB uint8 [256, 256, 3], original slice (h, w)) of axial index ``k`` of a uint8 volume."""
    plane = lpi_slice(volume_u8, k)
    return gray_to_rgb(pad_to_target(plane)), (int(plane.shape[0]), int(plane.shape[1]))


def to_model_tensor(rgb: np.ndarray) -> Tensor:
    """RGB uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] (ToTensor, then mean = std = 0.5)."""
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def encoder_inputs(rgb: np.ndarray) -> tuple[Tensor, Tensor]:
    """(VAE input, ViT input), each float32 [3, H, W] in [-1, 1], of a context image.

    As their code: the image is first resized by the VAE rule (``vae_transform.resize_transform``),
    then the VAE transform resizes it again (a no-op once sides are multiples of 16) and the ViT
    transform resizes that to multiples of 14 (256 -> 252).
    """
    once = resize_rgb(rgb, VAE_RESIZE)
    return to_model_tensor(resize_rgb(once, VAE_RESIZE)), to_model_tensor(resize_rgb(once, VIT_RESIZE))


def generation_size(rgb: np.ndarray) -> tuple[int, int]:
    """(H, W) of a generated image: the VAE rule applied to the (padded) input's size."""
    return resize_hw(rgb.shape[0], rgb.shape[1], VAE_RESIZE)


def decoded_to_rgb(x: Tensor) -> np.ndarray:
    """Decoded image [3, H, W] (about [-1, 1]) -> RGB uint8 [H, W, 3]: ``(x * 0.5 + 0.5).clamp(0, 1) * 255``, truncated."""
    img = (x.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255
    return img.to(torch.uint8).cpu().numpy()


def average_draws(draws: Sequence[np.ndarray]) -> np.ndarray:
    """Their ensemble (``sample_time``): mean of uint8 draws, truncated to uint8."""
    return np.mean(np.stack(list(draws)), axis=0).astype(np.uint8)


def output_slice(rgb: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
    """Generated RGB uint8 -> grey uint8 [h, w] on the slice: channel mean (truncated), centre crop.

    When their crop cannot restore the slice size (a slice with a side >= 256 that the VAE rule
    resized), the crop is resized to it (PIL bilinear) so that it can go back into the volume.
    """
    gray = crop_to_target(np.mean(rgb, axis=-1).astype(np.uint8), original_hw)
    if gray.shape != tuple(original_hw):
        gray = np.asarray(Image.fromarray(gray).resize((original_hw[1], original_hw[0]), Image.BILINEAR))
    return gray
