"""Shared test helper: a tiny synthetic slices folder (format ``unibrain-slices/1``).

Used by the baseline, trainer, stage, VAE-stage and distributed tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import save_file

from unibrain_cli.modalities import MODALITIES

S = 32


def _smooth_field(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    f = np.zeros_like(yy)
    for _ in range(4):
        cy, cx, sig = rng.uniform(6, 26), rng.uniform(6, 26), rng.uniform(3, 8)
        f += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sig**2))
    return (f - f.min()) / (f.max() - f.min())


def make_slice(rng: np.random.Generator, with_flair: bool = True) -> dict[str, np.ndarray]:
    """One synthetic slice: T1 = 0.3 + 0.5 f, T2 = 0.35 + 0.55 (1 - f), FLAIR = 0.1 + 0.3 (1 - f)
    inside an elliptic brain, a bright T2/FLAIR lesion, rim enhancement on T1ce."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    cy, cx = 16 + rng.uniform(-1.5, 1.5), 16 + rng.uniform(-1.5, 1.5)
    ry, rx = rng.uniform(11, 14), rng.uniform(10, 13)
    brain = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    f = _smooth_field(rng, yy, xx)
    ly, lx = cy + rng.uniform(-5, 5), cx + rng.uniform(-5, 5)
    d = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2)
    lesion = (d <= 3.0) & brain
    images = np.zeros((6, S, S), np.float32)
    t1 = 0.3 + 0.5 * f - 0.1 * lesion
    t2 = 0.35 + 0.55 * (1 - f) + 0.1 * lesion
    flair = 0.1 + 0.3 * (1 - f) + 0.05 * lesion
    t1ce = t1 + 0.3 * ((d > 2.0) & (d <= 3.0))
    for c, img in enumerate((t1, t2, flair, t1ce)):
        images[c] = np.clip(img, 0, 1) * brain
    present = np.array([1, 1, int(with_flair), 1, 0, 0], np.uint8)
    if not with_flair:
        images[2] = 0
    return {"images": images, "present": present, "mask": lesion.astype(np.uint8),
            "labels": lesion.astype(np.uint8), "brain": brain.astype(np.uint8)}


def save_slices_folder(root: Path, rows: list[dict], slices: list[dict[str, np.ndarray]], size: int,
                       shard_rows: int = 10) -> Path:
    """Write ``slices`` (dicts of images/present/mask/labels/brain) with their index ``rows`` as a
    ``unibrain-slices/1`` folder, ``shard_rows`` per shard; fills each row's ``shard``/``row``."""
    (root / "shards").mkdir(parents=True)
    for start in range(0, len(slices), shard_rows):
        name = f"shard-{start // shard_rows:05d}.safetensors"
        chunk = slices[start:start + shard_rows]
        save_file({k: np.stack([b[k] for b in chunk]) for k in chunk[0]}, str(root / "shards" / name))
        for j in range(len(chunk)):
            rows[start + j].update(shard=name, row=j)
    pd.DataFrame(rows).to_parquet(root / "index.parquet")
    meta = {"format": "unibrain-slices/1", "size": size, "axis": "axial", "modalities": list(MODALITIES),
            "num_slices": len(rows), "source": "synthetic"}
    (root / "slices.json").write_text(json.dumps(meta))
    return root


def write_slices(root: Path, n_cases: int = 12, per_case: int = 2, seed: int = 0, shard_rows: int = 10) -> Path:
    """A slices folder in the ``unibrain-slices/1`` format: ``n_cases`` cases of ``per_case`` slices
    (all but 4 train, 2 val, 2 test; every 4th case without FLAIR)."""
    rng = np.random.default_rng(seed)
    rows, slices = [], []
    splits = ["train"] * (n_cases - 4) + ["val"] * 2 + ["test"] * 2
    for c in range(n_cases):
        with_flair = c % 4 != 3
        for k in range(per_case):
            sl = make_slice(rng, with_flair)
            mods = [m for m, p in zip(MODALITIES, sl["present"]) if p]
            rows.append({
                "slice_id": f"case{c:02d}:{40 + k}", "case_id": f"case{c:02d}", "subset": "BraTS_GLI",
                "split": splits[c], "diseases": "glioma", "slice_k": 40 + k, "is_eval": k == per_case // 2,
                "shard": "", "row": 0, "modalities": "|".join(mods),
                "lesion_area_px": int(sl["mask"].sum()), "lesion_w_mm": 6.0, "lesion_h_mm": 6.0,
                "findings_2d": json.dumps({"t2": "hyperintense 6 * 6 mm lesion"}),
                "findings_3d": json.dumps({"t2": "hyperintense 6*6*5mm lesion"}),
                "global_finding_2d": "a lesion", "global_finding": "a lesion", "impression": "glioma",
            })
            slices.append(sl)
    return save_slices_folder(root, rows, slices, S, shard_rows)
