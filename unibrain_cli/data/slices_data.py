"""A small reader for a slices folder (format ``unibrain-slices/1``, written by ``unibrain slice``).

Layout::

    SLICES/slices.json        {"format": "unibrain-slices/1", "size": S, "modalities": [...], ...}
    SLICES/index.parquet      one row per slice (slice_id, case_id, split, is_eval, shard, row, ...)
    SLICES/shards/*.safetensors  images f32 [N, 6, S, S] in MODALITIES order, present u8 [N, 6],
                                 mask / labels / brain u8 [N, S, S]

The index is read eagerly (it is small); shard tensors are read lazily, one row at a time,
through memory-mapped ``safetensors`` handles kept open per shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unibrain_cli.errors import UserError
from unibrain_cli.modalities import MODALITIES, parse_modality

SLICES_FORMAT = "unibrain-slices/1"

#: Columns of index.parquet this reader relies on.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "slice_id", "case_id", "subset", "split", "diseases", "slice_k", "is_eval", "shard", "row",
    "modalities",
)
#: Tensors every shard must hold.
SHARD_TENSORS: tuple[str, ...] = ("images", "present", "mask", "labels", "brain")
#: Text columns passed through as strings when present.
TEXT_COLUMNS: tuple[str, ...] = ("global_finding_2d", "global_finding", "impression")
#: JSON-dict text columns decoded when present.
JSON_COLUMNS: tuple[str, ...] = ("findings_2d", "findings_3d")


def read_slices_meta(slices_dir: str | Path) -> dict[str, Any]:
    """Parse and check ``slices.json`` (format, size, modality order)."""
    root = Path(slices_dir)
    path = root / "slices.json"
    if not root.is_dir():
        raise UserError("slices folder does not exist; run `unibrain slice` first", str(root))
    if not path.is_file():
        raise UserError("not a slices folder (slices.json missing); run `unibrain slice` first", str(root))
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read slices.json ({exc}); re-run `unibrain slice`", str(path)) from exc
    if not isinstance(meta, dict) or meta.get("format") != SLICES_FORMAT:
        raise UserError(f"unsupported slices format {meta.get('format')!r}; expected {SLICES_FORMAT!r}",
                        str(path))
    if tuple(meta.get("modalities", ())) != MODALITIES:
        raise UserError(f"modality order {meta.get('modalities')} differs from {list(MODALITIES)}",
                        str(path))
    if not isinstance(meta.get("size"), int) or meta["size"] < 1:
        raise UserError(f"bad image size {meta.get('size')!r}", str(path))
    return meta


def load_index(slices_dir: str | Path) -> pd.DataFrame:
    """``index.parquet`` with its required columns checked (one row per slice)."""
    path = Path(slices_dir) / "index.parquet"
    if not path.is_file():
        raise UserError("index.parquet missing; re-run `unibrain slice`", str(path))
    try:
        index = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"cannot read index.parquet ({exc}); re-run `unibrain slice`", str(path)) from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in index.columns]
    if missing:
        raise UserError(f"index.parquet lacks columns {missing}", str(path))
    return index


def _as_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else set(value)


def filter_index(
    index: pd.DataFrame,
    split: str | Iterable[str] | None = None,
    is_eval: bool | None = None,
    require: Iterable[str] = (),
    subsets: str | Iterable[str] | None = None,
) -> pd.DataFrame:
    """Rows of ``index`` in ``split``/``subsets``, with ``is_eval`` as given, holding all ``require``d
    modalities (aliases accepted). None means no filter. The result has a fresh RangeIndex."""
    keep = np.ones(len(index), dtype=bool)
    splits = _as_set(split)
    if splits is not None:
        keep &= index["split"].isin(splits).to_numpy()
    subs = _as_set(subsets)
    if subs is not None:
        keep &= index["subset"].isin(subs).to_numpy()
    if is_eval is not None:
        keep &= index["is_eval"].astype(bool).to_numpy() == bool(is_eval)
    needed = {parse_modality(m, "required modalities") for m in require}
    if needed:
        present = index["modalities"].map(lambda s: needed.issubset(str(s).split("|")))
        keep &= present.to_numpy(dtype=bool)
    return index.loc[keep].reset_index(drop=True)


class SliceDataset:
    """Slices of one folder, filtered; items are dicts of numpy arrays plus metadata.

    Item keys: ``images`` float32 [6, S, S] (MODALITIES order, zeros where absent),
    ``present`` bool [6], ``mask`` / ``labels`` / ``brain`` uint8 [S, S], and the index
    fields ``slice_id``, ``case_id``, ``subset``, ``split``, ``slice_k``, ``is_eval``,
    ``diseases`` (tuple of class names), ``modalities`` (tuple), text columns and the
    decoded ``findings_2d`` / ``findings_3d`` dicts when the index has them.
    """

    def __init__(
        self,
        slices_dir: str | Path,
        split: str | Iterable[str] | None = None,
        is_eval: bool | None = None,
        require: Iterable[str] = (),
        subsets: str | Iterable[str] | None = None,
    ) -> None:
        self.root = Path(slices_dir)
        self.meta = read_slices_meta(self.root)
        self.size: int = int(self.meta["size"])
        self.index = filter_index(load_index(self.root), split, is_eval, require, subsets)
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self, shard: str) -> Any:
        if shard not in self._handles:
            from safetensors import safe_open

            path = self.root / "shards" / shard
            if not path.is_file():
                raise UserError("shard listed in index.parquet is missing; re-run `unibrain slice`", str(path))
            handle = safe_open(str(path), framework="numpy")
            names = set(handle.keys())
            missing = [k for k in SHARD_TENSORS if k not in names]
            if missing:
                raise UserError(f"shard lacks tensors {missing}", str(path))
            self._handles[shard] = handle
        return self._handles[shard]

    def arrays(self, i: int) -> dict[str, np.ndarray]:
        """Only the tensors of item ``i`` (see class docstring)."""
        rec = self.index.iloc[i]
        handle = self._handle(str(rec["shard"]))
        row = int(rec["row"])
        out = {k: np.asarray(handle.get_slice(k)[row:row + 1][0]) for k in SHARD_TENSORS}
        out["images"] = out["images"].astype(np.float32, copy=False)
        out["present"] = out["present"].astype(bool)
        if out["images"].shape != (len(MODALITIES), self.size, self.size):
            raise UserError(f"slice {rec['slice_id']} has images of shape {out['images'].shape}; "
                            f"expected {(len(MODALITIES), self.size, self.size)}", str(self.root))
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        rec = self.index.iloc[i]
        item: dict[str, Any] = self.arrays(i)
        item.update(
            slice_id=str(rec["slice_id"]), case_id=str(rec["case_id"]), subset=str(rec["subset"]),
            split=str(rec["split"]), slice_k=int(rec["slice_k"]), is_eval=bool(rec["is_eval"]),
            diseases=tuple(d for d in str(rec["diseases"]).split("|") if d),
            modalities=tuple(m for m in str(rec["modalities"]).split("|") if m),
        )
        for col in TEXT_COLUMNS:
            if col in rec.index:
                item[col] = "" if pd.isna(rec[col]) else str(rec[col])
        for col in JSON_COLUMNS:
            if col in rec.index:
                item[col] = json.loads(rec[col]) if isinstance(rec[col], str) and rec[col] else {}
        return item

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Stacked tensors of several items: images [B, 6, S, S], present [B, 6], mask/labels/brain
        [B, S, S]."""
        items = [self.arrays(int(i)) for i in indices]
        if not items:
            s = self.size
            return {"images": np.zeros((0, len(MODALITIES), s, s), np.float32),
                    "present": np.zeros((0, len(MODALITIES)), bool),
                    **{k: np.zeros((0, s, s), np.uint8) for k in ("mask", "labels", "brain")}}
        return {k: np.stack([it[k] for it in items]) for k in SHARD_TENSORS}
