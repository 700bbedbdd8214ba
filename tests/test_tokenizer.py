"""Byte-level BPE tokenizer with Qwen2 special-token names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from unibrain_cli.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_bpe
from unibrain_cli.errors import UserError

REPORTS = [
    "Findings: T2/FLAIR hyperintense lesion in the left frontal lobe with mass effect.",
    "Impression: findings suggest a high-grade glioma. Final Diagnosis: glioma",
    "Extra-axial dural-based mass along the right convexity; homogeneous enhancement.",
    "Restricted diffusion (DWI bright, ADC dark) in the left MCA territory — acute stroke.",
    "Multiple ring-enhancing lesions at the grey-white junction, surrounding oedema: metastasis.",
    "Periventricular and subcortical white matter hyperintensities, Fazekas grade 2.",
] * 3


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_bpe(REPORTS, vocab_size=400)


def test_round_trip_report_text(tok: TextTokenizer) -> None:
    for text in [*REPORTS[:6], "  Odd spacing\n\ttabs, ünïcödé 12.5 mm², and 中文 "]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert len(tok.encode(REPORTS[0])) < len(REPORTS[0].encode())  # merges compress


def test_special_ids_distinct_skipped_and_never_produced(tok: TextTokenizer) -> None:
    ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.image_start_id, tok.image_end_id]
    assert len(set(ids)) == 5 and max(ids) < tok.vocab_size
    assert ids == [0, 1, 2, 3, 4]
    assert tok.vocab_size <= 400
    text = "Final Diagnosis: glioma"
    assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id, tok.pad_id]) == text
    # encode adds no special token of its own
    assert not set(tok.encode(REPORTS[1])) & tok.special_ids


def test_save_load_identical(tok: TextTokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "ckpt")
    assert path.name == "tokenizer.json" and path.is_file()
    again = TextTokenizer.load(tmp_path / "ckpt")
    for text in REPORTS[:6]:
        assert again.encode(text) == tok.encode(text)
    assert again.vocab_size == tok.vocab_size and again.eos_id == tok.eos_id


def test_training_is_deterministic(tok: TextTokenizer) -> None:
    other = train_bpe(REPORTS, vocab_size=400)
    assert other.tokenizer.to_str() == tok.tokenizer.to_str()


def test_qwen_style_folder_ids_by_name(tok: TextTokenizer, tmp_path: Path) -> None:
    # a tokenizer whose special tokens sit at the END of the vocab (as Qwen2's 151643..)
    from tokenizers import AddedToken, Tokenizer

    base = Tokenizer.from_str(tok.tokenizer.to_str())
    data = json.loads(base.to_str())
    data["added_tokens"] = []
    vocab = data["model"]["vocab"]
    for name in SPECIAL_TOKENS:
        vocab.pop(name)
    data["model"]["vocab"] = {k: i for i, k in enumerate(sorted(vocab, key=vocab.get))}
    plain = Tokenizer.from_str(json.dumps(data))
    plain.add_special_tokens([AddedToken(n, special=True) for n in reversed(SPECIAL_TOKENS)])
    (tmp_path / "qwen").mkdir()
    plain.save(str(tmp_path / "qwen" / "tokenizer.json"))
    q = TextTokenizer.load(tmp_path / "qwen")
    n = q.vocab_size
    assert [q.image_end_id, q.image_start_id, q.eos_id, q.bos_id, q.pad_id] == list(range(n - 5, n))
    assert q.decode(q.encode(REPORTS[0])) == REPORTS[0]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no tokenizer.json"):
        TextTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        TextTokenizer.load(tmp_path)
    with pytest.raises(UserError, match="vocab_size"):
        train_bpe(REPORTS, vocab_size=100)
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=re.escape("no special token '<|endoftext|>'")):
        TextTokenizer.load(tmp_path)
