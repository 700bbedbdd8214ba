"""Text tokenizer: a byte-level BPE (``tokenizers``) with Qwen2's special-token names.

Our own scales train a small byte-level BPE on the training reports (:func:`train_bpe`) and
save it with the checkpoint as ``tokenizer.json``; the ``bagel-7b`` scale loads Qwen2's
``tokenizer.json`` from a local folder. Either way the special ids are looked up by name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import write_text

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_START_TOKEN = "<|vision_start|>"
IMAGE_END_TOKEN = "<|vision_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN)
TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` exposing the ids the model needs."""

    def __init__(self, tokenizer: Tokenizer, where: str | None = None) -> None:
        self._tok = tokenizer
        ids: dict[str, int] = {}
        for name in SPECIAL_TOKENS:
            idx = tokenizer.token_to_id(name)
            if idx is None:
                raise UserError(
                    f"tokenizer has no special token {name!r}; use a Qwen2 tokenizer or one made by train_bpe",
                    where=where,
                )
            ids[name] = idx
        self._ids = ids

    @property
    def tokenizer(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def pad_id(self) -> int:
        return self._ids[PAD_TOKEN]

    @property
    def bos_id(self) -> int:
        """``<|im_start|>``: opens a text segment."""
        return self._ids[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        """``<|im_end|>``: closes a text segment; generation stops on it."""
        return self._ids[EOS_TOKEN]

    @property
    def image_start_id(self) -> int:
        return self._ids[IMAGE_START_TOKEN]

    @property
    def image_end_id(self) -> int:
        return self._ids[IMAGE_END_TOKEN]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._ids.values())

    @property
    def vocab_size(self) -> int:
        """Number of ids in use, added tokens included (every id is < this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/tokenizer.json`` atomically; returns its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, self._tok.to_str())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TextTokenizer:
        """Load ``directory/tokenizer.json`` (ours or a local Qwen2 tokenizer folder)."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no {TOKENIZER_FILE} in this folder; pass a checkpoint or tokenizer folder", where=str(directory))
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise UserError(f"cannot read tokenizer ({exc}); the file is corrupt or not a tokenizers file", where=str(path)) from exc
        return cls(tok, where=str(path))


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE on ``texts``.

    The 256 byte symbols and the five special tokens (ids 0-4, in ``SPECIAL_TOKENS`` order)
    are always present, so ``vocab_size`` must exceed 261; the result may be smaller than
    ``vocab_size`` when the corpus has fewer merges to offer. Deterministic for a given input.
    """
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise UserError(f"vocab_size must be > {floor} (bytes + special tokens), got {vocab_size}", where="vocab_size")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)
