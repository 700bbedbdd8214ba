"""A key/value cache of B sequences in padded buffers, for batched inference (many slices at once).

:class:`~unibrain_cli.model.kv_cache.KVCache` holds one sequence and grows by concatenation
(cheap O(1) snapshots, what DHS and classifier-free-guidance branches need). Imputing a whole
volume runs the same protocol on every slice: B sequences with the same structure whose lengths
drift apart only where the model writes text of different lengths. :class:`BatchKVCache`
stores them per layer in one buffer ``[B, capacity, Hkv, D]`` with a length per row, so one
decoder forward serves a block of every row (or of a subset of rows, e.g. those still
generating text):

- the block's new keys/values are written in place right after each row's cached keys
  (scratch space when the forward does not update the cache: a query such as the noisy image
  of an Euler step leaves the lengths unchanged, so its keys are overwritten by the next block);
- attention is one padded SDPA per layer, queries ``[B', n_max]`` over keys ``[B', L_max]``,
  with a boolean mask = each row's cached keys + the block's own split rule
  (:func:`unibrain_cli.model.attention.dense_mask`) and nothing of the padding.

Rows never see each other. Results match running each row on its own :class:`KVCache` up to
float rounding (tests/test_batch_inference.py). No autograd: inference only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from unibrain_cli.model.attention import MODE_NOISE, dense_mask
from unibrain_cli.model.kv_cache import KVCache, SlotImage
from unibrain_cli.model.packing import PackedSequence


class BatchKVCache:
    """Cached keys/values of ``batch`` sequences (see the module docstring).

    Attributes:
        keys, values: per layer [B, capacity, Hkv, D] (allocated at the first block).
        lengths: cached tokens per row; next_positions: RoPE counter per row.
        images: per row, the clean slot images of its context (``model.aligned_context``).
        views: per row, the slotted ViT views of its context (``model.fused_view``).
    """

    def __init__(self, num_layers: int, batch: int) -> None:
        if batch < 1:
            raise ValueError(f"a batch cache needs at least one row, got {batch}")
        self.num_layers = num_layers
        self.batch = batch
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.lengths: list[int] = [0] * batch
        self.next_positions: list[int] = [0] * batch
        self.images: list[tuple[SlotImage, ...]] = [() for _ in range(batch)]
        self.views: list[tuple[tuple[int, Tensor], ...]] = [() for _ in range(batch)]

    def __repr__(self) -> str:
        return f"BatchKVCache(batch={self.batch}, lengths={self.lengths})"

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0

    def reserve(self, needed: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make room for ``needed`` tokens per row (capacity doubles, so appends are amortised O(1))."""
        if self.keys and needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity, 64)
        shape = (self.batch, cap, heads, dim)
        new_k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        new_v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        if self.keys:
            used = max(self.lengths)
            for i in range(self.num_layers):
                new_k[i][:, :used] = self.keys[i][:, :used]
                new_v[i][:, :used] = self.values[i][:, :used]
        self.keys, self.values = new_k, new_v

    def row(self, b: int) -> KVCache:
        """Row ``b`` as an independent single-sequence :class:`KVCache` (copies its keys/values)."""
        cache = KVCache(self.num_layers)
        n = self.lengths[b]
        if n:
            cache.layers = [(k[b, :n].clone(), v[b, :n].clone()) for k, v in zip(self.keys, self.values, strict=True)]
        cache.length = n
        cache.next_position = self.next_positions[b]
        cache.images = self.images[b]
        cache.views = self.views[b]
        return cache

    def nbytes(self) -> int:
        """Memory held by the buffers, in bytes."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class BatchStep:
    """One forward of a multi-sample block against rows of a :class:`BatchKVCache`.

    Sample i of ``block`` continues row ``rows[i]``. Built once per forward (index tensors and
    the mask are shared by every layer); :meth:`layer` gives the per-layer attention.
    """

    cache: BatchKVCache
    rows: list[int]
    block: PackedSequence
    slot_row: Tensor  # long [N] index into rows (0..B'-1) of each block row
    slot_pos: Tensor  # long [N] position of each block row in its cache row
    query_pos: Tensor  # long [N] index of each block row among its sample's queries
    row_index: Tensor  # long [B'] cache rows
    mask: Tensor  # bool [B', 1, n_max, L_max]
    n_max: int
    l_max: int

    @staticmethod
    def plan(cache: BatchKVCache, rows: Sequence[int], block: PackedSequence) -> BatchStep:
        rows = [int(r) for r in rows]
        if block.num_samples != len(rows):
            raise ValueError(f"the block holds {block.num_samples} samples for {len(rows)} cache rows")
        if len(set(rows)) != len(rows) or not all(0 <= r < cache.batch for r in rows):
            raise ValueError(f"rows must be distinct indices of the {cache.batch}-row cache, got {rows}")
        dev = block.device
        lens = block.sample_lens
        starts = [0, *torch.tensor(lens).cumsum(0).tolist()]
        cached = [cache.lengths[r] for r in rows]
        n_max, l_max = max(lens), max(c + n for c, n in zip(cached, lens, strict=True))
        sample = block.sample_ids
        query_pos = torch.arange(block.length, device=dev) - torch.tensor(starts[:-1], device=dev)[sample]
        slot_pos = query_pos + torch.tensor(cached, device=dev)[sample]
        mask = torch.zeros(len(rows), 1, n_max, l_max, dtype=torch.bool, device=dev)
        info = block.mask_info()
        for i, (c, n) in enumerate(zip(cached, lens, strict=True)):
            s = starts[i]
            mask[i, 0, :n, :c] = True
            mask[i, 0, :n, c:c + n] = dense_mask(info, (s, s + n), (s, s + n))
            mask[i, 0, n:, : c + n] = True  # padded queries: any visible key (their output is dropped)
        return BatchStep(cache, rows, block, sample, slot_pos, query_pos,
                         torch.tensor(rows, device=dev), mask, n_max, l_max)

    def layer(self, index: int) -> BatchLayer:
        return BatchLayer(self, index)

    def commit(self) -> None:
        """Keep the block's non-noise keys/values in the cache and advance each row."""
        info = self.block.mask_info()
        starts = [0, *torch.tensor(self.block.sample_lens).cumsum(0).tolist()]
        for i, r in enumerate(self.rows):
            s, e = starts[i], starts[i + 1]
            noise = info.q_mode[s:e] == MODE_NOISE
            c = self.cache.lengths[r]
            if bool(noise.any()):  # drop noise rows: move the kept keys together
                keep = (~noise).nonzero().flatten() + c
                for buf in (*self.cache.keys, *self.cache.values):
                    buf[r, c:c + keep.numel()] = buf[r, keep]
                added = int(keep.numel())
            else:
                added = e - s
            self.cache.lengths[r] = c + added
            self.cache.next_positions[r] += self.block.sample_next_positions[i]


@dataclass
class BatchLayer:
    """The ``past`` of one decoder layer in a batched forward (``MoTAttention`` calls :meth:`attend`)."""

    step: BatchStep
    index: int

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
        """Write the block's k/v [N, Hkv, D] after each row's cache and attend; q [N, Hq, D] -> [N, Hq, D]."""
        st = self.step
        cache = st.cache
        row_of = st.row_index[st.slot_row]
        kb, vb = cache.keys[self.index], cache.values[self.index]
        kb[row_of, st.slot_pos] = k.to(kb.dtype)
        vb[row_of, st.slot_pos] = v.to(vb.dtype)
        if st.rows == list(range(cache.batch)):
            keys, values = kb[:, :st.l_max], vb[:, :st.l_max]
        else:
            keys, values = kb[st.row_index, :st.l_max], vb[st.row_index, :st.l_max]
        ragged = q.shape[0] != len(st.rows) * st.n_max
        if ragged:
            qp = q.new_zeros(len(st.rows), st.n_max, *q.shape[1:])
            qp[st.slot_row, st.query_pos] = q
        else:  # every sample has n_max rows: a view, no padding
            qp = q.view(len(st.rows), st.n_max, *q.shape[1:])
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
            attn_mask=st.mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        ).transpose(1, 2)
        return out[st.slot_row, st.query_pos] if ragged else out.reshape(q.shape)
