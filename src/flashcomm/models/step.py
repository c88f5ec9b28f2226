"""One forward step of a varlen batch (Step: index metadata, RoPE tables, masks) and the KV cache.

Built once per step and shared by every layer: nothing here depends on the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Step:
    """Index metadata of one forward over B sequences, each adding n_b tokens at start_b."""

    num_tokens: int
    """T: tokens in this step over all sequences."""
    seq: Tensor
    """[T] cache row (sequence) of each flat token."""
    pos: Tensor
    """[T] absolute position of each flat token."""
    offset: Tensor
    """[T] index of each flat token within its sequence's new tokens."""
    gather: Tensor
    """[B, n_max] flat index feeding each padded query slot (pads repeat the last token)."""
    q_pos: Tensor
    """[B, n_max] absolute position of each padded query slot."""
    kv_len: int
    """S: cache length every sequence is attended over (max start_b + n_b)."""
    logit_rows: Tensor | None = None
    """Flat rows whose logits are returned (None: all rows)."""
    cos: Tensor | None = None
    """[T, hd] RoPE cosines of each flat token (built once per step, shared by every layer)."""
    sin: Tensor | None = None
    """[T, hd] RoPE sines."""
    masks: dict[int | None, Tensor] = field(default_factory=dict)
    """Attention window -> [B, 1, n_max, S] mask, built once per step for the model's windows."""

    @classmethod
    def build(cls, starts: list[int], counts: list[int], device: torch.device,
              last_only: bool = True, *, inv_freq: Tensor | None = None,
              dtype: torch.dtype = torch.float32, windows: tuple[int | None, ...] = ()) -> Step:
        """A step where sequence b adds counts[b] >= 1 tokens after its first starts[b]; with
        `inv_freq`, its RoPE tables in `dtype`, and a mask per attention window in `windows`."""
        if any(c < 1 for c in counts):
            raise ValueError(f"counts={counts}: every sequence must add at least one token")
        n_max = max(counts)
        seq = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        first = torch.tensor([0, *counts[:-1]]).cumsum(0)  # flat index of each sequence's 1st
        offset = torch.arange(len(seq)) - first[seq]
        j = torch.minimum(torch.arange(n_max)[None, :], torch.tensor(counts)[:, None] - 1)
        start = torch.tensor(starts)
        last = first + torch.tensor(counts) - 1
        step = cls(
            num_tokens=len(seq), seq=seq.to(device), pos=(start[seq] + offset).to(device),
            offset=offset.to(device), gather=(first[:, None] + j).to(device),
            q_pos=(start[:, None] + j).to(device),
            kv_len=max(s + c for s, c in zip(starts, counts, strict=True)),
            logit_rows=last.to(device) if last_only else None,
        )
        if inv_freq is not None:
            freqs = step.pos[:, None].float() * inv_freq[None, :]  # [T, hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
            step.cos, step.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        step.masks.update({w: step.mask(w) for w in set(windows)})
        return step

    def mask(self, window: int | None) -> Tensor:
        """[B, 1, n_max, S] bool: key position k visible to a query at position q (the one
        built with the step when there is one)."""
        if window in self.masks:
            return self.masks[window]
        k = torch.arange(self.kv_len, device=self.q_pos.device)
        q = self.q_pos[:, None, :, None]
        m = k <= q
        if window is not None:
            m &= q - k < window
        return m


@dataclass
class KVCache:
    """Per layer key/value buffers [B, S_max, local kv heads, head_dim] for a batch of B rows."""

    k: list[Tensor] = field(default_factory=list)
    """Keys per layer."""
    v: list[Tensor] = field(default_factory=list)
    """Values per layer."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
