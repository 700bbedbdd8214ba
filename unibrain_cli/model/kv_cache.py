"""Key/value cache of one sequence for inference and DHS rollouts (separate from the model).

The cache holds, per decoder layer, the RoPE-rotated keys and the values of every *visible*
context token seen so far (text, ViT, clean VAE), plus the RoPE position counter. Tokens of
``noise`` splits are never stored: no later token may see them, so a cache never needs a mask —
every cached key is visible to every later query of the same sequence.

Operations (driven by ``UniBrainModel.forward_cached`` and friends):

- *prefill / append a block*: run a block (one-sample :class:`~unibrain_cli.model.packing.PackedSequence`)
  against the cache and store its non-noise keys/values (:meth:`KVCache.append`);
- *query a block without updating*: the same forward but nothing is stored (the noisy image at
  every denoising step);
- *snapshot / restore / fork*: tensors are never modified in place (appends concatenate into
  new tensors), so a snapshot is just the list of tensor references plus two counters — O(1)
  memory, and classifier-free-guidance contexts can branch off a shared prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

KV = tuple[Tensor, Tensor]
#: (modality slot, latent grid, latents [T, D]): see ``unibrain_cli.model.aligned``.
SlotImage = tuple[int, tuple[int, int], Tensor]


@dataclass(frozen=True)
class CacheSnapshot:
    """An immutable view of a cache state (references to its tensors; no copies)."""

    layers: tuple[KV, ...]
    length: int
    next_position: int
    images: tuple[SlotImage, ...] = ()
    views: tuple[tuple[int, Tensor], ...] = ()


class KVCache:
    """Per-layer cached keys/values [L, Hkv, D] of one sequence plus its position counter.

    Args:
        num_layers: decoder depth.
        detach: store keys/values detached from the autograd graph (inference; default). DHS
            code that backpropagates through a rollout context passes False.

    Attributes:
        layers: per layer (k, v), each [length, Hkv, D] (empty list until the first append).
        length: cached tokens L.
        next_position: RoPE position the next block starts at.
        images: the clean VAE images of the cached context that carry a modality slot, oldest
            first (``model.aligned_context`` reads them; recorded only when it is on).
        views: the ViT views of the cached context that carry a slot, (slot, ViT inputs), oldest
            first (``model.fused_view`` reads them; recorded only when it is on).
    """

    def __init__(self, num_layers: int, detach: bool = True) -> None:
        self.num_layers = num_layers
        self.detach = detach
        self.layers: list[KV] = []
        self.length = 0
        self.next_position = 0
        self.images: tuple[SlotImage, ...] = ()
        self.views: tuple[tuple[int, Tensor], ...] = ()

    def __repr__(self) -> str:
        return f"KVCache(num_layers={self.num_layers}, length={self.length}, next_position={self.next_position})"

    def past(self) -> list[KV] | None:
        """Per-layer (k, v) for the decoder, or None when empty."""
        return list(self.layers) if self.length else None

    def append(self, present: list[KV], keep: Tensor | None, advance: int,
               images: Sequence[SlotImage] = (), views: Sequence[tuple[int, Tensor]] = ()) -> None:
        """Store a block's keys/values.

        Args:
            present: per layer the block's (k, v), each [n, Hkv, D].
            keep: long [m] rows of the block to store (its non-noise tokens), or None = all.
            advance: how far the block moved the RoPE position counter.
            images: the block's clean slot images (appended to :attr:`images`).
            views: the block's slotted ViT views (appended to :attr:`views`).
        """
        if views:
            self.views = self.views + tuple((slot, p.detach()) for slot, p in views)
        if images:
            self.images = self.images + tuple(
                (slot, grid, lat.detach() if self.detach else lat) for slot, grid, lat in images)
        if len(present) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of keys/values, got {len(present)}")
        if keep is not None:
            present = [(k[keep], v[keep]) for k, v in present]
        if self.detach:
            present = [(k.detach(), v.detach()) for k, v in present]
        added = int(present[0][0].shape[0])
        if self.length == 0:
            self.layers = list(present)
        else:
            self.layers = [
                (torch.cat([ck, k]), torch.cat([cv, v]))
                for (ck, cv), (k, v) in zip(self.layers, present, strict=True)
            ]
        self.length += added
        self.next_position += advance

    def snapshot(self) -> CacheSnapshot:
        """The current state, O(1): later appends never change it."""
        return CacheSnapshot(tuple(self.layers), self.length, self.next_position, self.images, self.views)

    def restore(self, snap: CacheSnapshot) -> None:
        """Return to a snapshot taken from this cache (or any cache of the same depth)."""
        self.layers = list(snap.layers)
        self.length = snap.length
        self.next_position = snap.next_position
        self.images = snap.images
        self.views = snap.views

    def fork(self) -> KVCache:
        """An independent cache starting from this state (shares the tensors, copies nothing)."""
        other = KVCache(self.num_layers, self.detach)
        other.restore(self.snapshot())
        return other

    @staticmethod
    def from_snapshot(snap: CacheSnapshot, num_layers: int) -> KVCache:
        """A new cache in state ``snap``."""
        cache = KVCache(num_layers)
        cache.restore(snap)
        return cache

    def nbytes(self) -> int:
        """Memory held by the cached tensors, in bytes."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)
