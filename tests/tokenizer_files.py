"""Hugging Face tokenizer files (vocab.json + merges.txt) written from one of our CLIP vocabularies, so that
transformers' CLIPTokenizer, and diffusers' pipelines built on it, tokenize with the same vocabulary offline."""
from __future__ import annotations

import json
from pathlib import Path

from lineage.train.tokenizer import SDXLTokenizer


def write_hf_tokenizer(tokenizer: SDXLTokenizer, folder: Path, pad_token: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend = tokenizer.bpe.tokenizer
    (folder / "vocab.json").write_text(json.dumps(backend.get_vocab()), encoding="utf-8")
    merges = json.loads(backend.to_str())["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    if pad_token is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}), encoding="utf-8")
    return folder


def transformers_tokenizer(folder: Path, **kwargs):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), **kwargs)
