"""A small CLIP BPE tokenizer built from a prompt vocabulary.

Tiny models cannot ship the 49408-token CLIP vocabulary, yet the training code should run the
real `CLIPTokenizer`. So the vocabulary is built from the words the prompts use: every word is
one token (``word</w>``), every byte-level character and ``char</w>`` piece is there as a
fallback, and `<|startoftext|>` / `<|endoftext|>` close the list as in CLIP. The merges come from
running byte-pair encoding over the word list until each word is a single symbol, so replaying
them (which is what the tokenizer does) rebuilds each word exactly.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

from mame_lightning.io import write_text

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
# CLIP's pre-tokenizer splits text into letter runs, single digits and punctuation runs.
_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


def byte_alphabet() -> dict[int, str]:
    """The printable character that byte-level BPE (GPT-2 / CLIP) writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def split_words(texts: list[str]) -> list[str]:
    """Lowercased pre-tokenizer pieces of the given words or whole prompts, first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        if not isinstance(text, str):  # YAML reads a bare no/yes/on/off as a boolean
            raise TypeError(f"tokenizer words must be strings, got {text!r}; quote it in the YAML list")
        for piece in _PIECES.findall(text.lower()):
            seen.setdefault(piece, None)
    return list(seen)


def _symbols(word: str, alphabet: dict[int, str]) -> tuple[str, ...]:
    chars = [alphabet[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def _pair_counts(words: list[tuple[str, ...]]) -> Counter:
    counts: Counter = Counter()
    for symbols in words:
        counts.update(zip(symbols, symbols[1:]))
    return counts


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (most frequent pair first, ties by text) until every word is one symbol."""
    alphabet = byte_alphabet()
    pieces = [_symbols(w, alphabet) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts = _pair_counts(pieces)
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        pieces = [_merge(p, best) for p in pieces]


def clip_vocab(words: list[str], pad_to: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab (CLIP order: bytes, bytes+</w>, merged symbols, [fillers], BOS, EOS) and merges."""
    alphabet = list(byte_alphabet().values())
    merges = learn_merges(split_words(words))
    tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet)]
    known = set(tokens)
    for left, right in merges:
        if left + right not in known:
            tokens.append(left + right)
            known.add(left + right)
    if pad_to is not None:
        if pad_to < len(tokens) + 2:
            raise ValueError(f"pad_to={pad_to} is smaller than the {len(tokens) + 2} tokens the words need")
        tokens += [f"<|unused_{i}|>" for i in range(pad_to - len(tokens) - 2)]
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer_files(folder: str | os.PathLike, words: list[str], pad_to: int | None = None) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json that `CLIPTokenizer` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab(words, pad_to)
    write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,  # Stable Diffusion v1 pads with the end token
        "do_lower_case": True,
    }
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    return folder


def build_tokenizer(words: list[str], pad_to: int | None = None):
    """A `CLIPTokenizer` whose vocabulary holds each of `words` as a single token."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp, words, pad_to)
        return CLIPTokenizer.from_pretrained(tmp)
