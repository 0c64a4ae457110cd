"""Prompt embeddings of a frozen text encoder, computed once per distinct prompt and reused.

A frozen CLIP encoder in eval mode maps the same token ids to the same hidden states every step,
and a mammography data set has few distinct prompts (vendor x view x density x area, plus the empty
prompt of classifier-free guidance), so UNet-only and LoRA-on-UNet runs need no CLIP forward once
each prompt has been seen. Entries live on the encoder's device; the least recently used one is
dropped past `max_entries`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch


class PromptEmbeddingCache:
    """`embed(input_ids)` equals `encode(input_ids)`, with each distinct row encoded at most once."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], max_entries: int = 1024):
        if int(max_entries) < 1:
            raise ValueError(f"the prompt embedding cache needs max_entries >= 1, got {max_entries}")
        self.encode = encode
        self.max_entries = int(max_entries)
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.encoded_rows = 0  # rows that went through the encoder (the rest came from the cache)

    def __len__(self) -> int:
        return len(self.entries)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        where = str(input_ids.device)  # a module moved to another device starts a fresh set of entries
        keys = [(where, *row) for row in input_ids.tolist()]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))
        if missing:
            fresh = torch.tensor([k[1:] for k in missing], dtype=input_ids.dtype, device=input_ids.device)
            with torch.no_grad():
                hidden = self.encode(fresh)
            self.encoded_rows += len(missing)
            for key, row in zip(missing, hidden):
                self.entries[key] = row.detach()
        rows = []
        for key in keys:
            self.entries.move_to_end(key)
            rows.append(self.entries[key])
        out = torch.stack(rows)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return out

    def clear(self) -> None:
        self.entries.clear()


__all__ = ["PromptEmbeddingCache"]
