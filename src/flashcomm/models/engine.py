"""Batched generation on one rank: prefill, KV cache, greedy (or temperature) decoding, metrics.

Every TP rank runs the same Engine on the same prompts; the next tokens are broadcast from TP
rank 0 each step so all ranks feed identical ids even with sampling. Under pipeline parallelism
each rank runs its stage (models/pipeline.py) and the last stage's tokens are broadcast over the
PP group; DP replicas each run the whole batch on their own. Metrics are per rank.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import Tensor

from flashcomm.comm import CommCounter
from flashcomm.config import FlashCommConfig
from flashcomm.groups import ParallelGroups
from flashcomm.knobs import FlashCommError
from flashcomm.model_args import ModelArgs
from flashcomm.models import pipeline
from flashcomm.models.loader import LoadReport, load_model
from flashcomm.models.transformer import Transformer


class RequestError(FlashCommError, ValueError):
    """A generation request the model cannot serve; the message names the input and the limit."""


def check_request(args: ModelArgs, prompts: list[list[int]], max_new_tokens: int) -> None:
    """RequestError for an empty batch or prompt, max_new_tokens < 1, a token id outside the
    vocabulary, or a prompt + max_new_tokens longer than max_position_embeddings."""
    if not prompts:
        raise RequestError("prompts: none given; pass at least one")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise RequestError(f"prompt {empty[0]} is empty: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise RequestError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    bad = [t for p in prompts for t in p if not 0 <= t < args.vocab_size]
    if bad:
        raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {args.vocab_size})")
    limit = args.max_position_embeddings
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    n = len(prompts[longest])
    if limit is not None and n + max_new_tokens > limit:
        raise RequestError(
            f"prompt {longest}: {n} tokens + max_new_tokens={max_new_tokens} = "
            f"{n + max_new_tokens} is longer than the model's max_position_embeddings={limit}; "
            f"shorten the prompt or ask for at most {max(limit - n, 0)} new tokens")


def stop_token_ids(path: str | Path) -> tuple[int, ...]:
    """The checkpoint's end-of-sequence / end-of-turn ids: eos_token_id of config.json and of
    generation_config.json (chat models often list their end-of-turn token only there)."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        f = Path(path) / name
        eos = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
        for t in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            if t not in ids:
                ids.append(int(t))
    return tuple(ids)


def has_chat_template(path: str | Path) -> bool:
    """Whether the checkpoint at `path` ships a chat template (chat_template.jinja, as
    transformers >= 5 saves it, or tokenizer_config.json's chat_template)."""
    root = Path(path)
    if (root / "chat_template.jinja").is_file():
        return True
    f = root / "tokenizer_config.json"
    return f.is_file() and bool(json.loads(f.read_text()).get("chat_template"))


def chat_prompt_ids(path: str | Path, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as one user turn through the checkpoint's chat template
    (transformers' apply_chat_template), ending with the assistant's generation prompt."""
    from transformers import AutoTokenizer  # imported only for chat: it takes seconds

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise RequestError(f"{path}: no tokenizer for --chat ({e})") from None
    if not getattr(tok, "chat_template", None):
        raise RequestError(f"{path}: the checkpoint has no chat template; drop --chat")
    return [list(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False))
            for p in prompts]


@dataclass
class GenerationResult:
    """Generated ids plus this rank's timings, memory and traffic."""

    tokens: list[list[int]]
    """New token ids per prompt (cut after EOS when stopping at EOS)."""
    text: list[str] | None
    """Decoded new tokens per prompt, when a tokenizer exists."""
    prefill_ms: float
    """Wall time of the batched prefill step (first token included)."""
    decode_ms_per_token: float
    """Mean wall time of one decode step (one new token for every sequence)."""
    decode_steps: int
    """Decode steps run (max_new_tokens - 1 unless every sequence hit EOS)."""
    o_proj_bytes: int
    """Resident o_proj weight bytes on this rank (ring buffers included)."""
    weight_bytes: int
    """All resident weight bytes on this rank."""
    kv_cache_bytes: int
    """Bytes of this rank's KV cache for this batch."""
    comm_bytes: int
    """Bytes this rank sent in the model's collectives during generation."""
    comm_bytes_by_op: dict[str, int] = field(default_factory=dict)
    """comm_bytes split by collective."""
    prefill_comm_bytes: int = 0
    """comm_bytes of the prefill step."""
    decode_comm_bytes_per_step: float = 0.0
    """Mean comm_bytes of one decode step."""
    fetch_bytes_per_step: float = 0.0
    """O-Shard: o_proj bytes received into the ring per forward step (0 otherwise)."""
    blocked_wait_ms: float = 0.0
    """O-Shard: host time blocked in series.wait during generation."""
    prefill_fetch_bytes: int = 0
    """Layer-sharded o_proj: weight bytes received into the ring during the prefill step."""
    decode_fetch_bytes_per_step: float = 0.0
    """Layer-sharded o_proj: mean weight bytes received per decode step (0 under the gather
    source when decode takes the row-parallel path)."""
    prefill_blocked_wait_ms: float = 0.0
    """Layer-sharded o_proj: host time blocked in series.wait during the prefill step."""
    decode_blocked_wait_ms_per_step: float = 0.0
    """Layer-sharded o_proj: mean host time blocked in series.wait per decode step."""
    layers: tuple[int, int] = (0, 0)
    """[start, stop) of the decoder layers this rank's pipeline stage ran."""

    def to_dict(self) -> dict:
        """Every field as plain lists, dicts and numbers (what json.dumps and pickling take)."""
        return asdict(self)


class Engine:
    """A loaded model plus tokenizer; `generate` runs one batch to completion."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None,
                 eos_token_ids: tuple[int, ...] = (), load_report: LoadReport | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.load_report = load_report or LoadReport()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        cfg: FlashCommConfig,
        groups: ParallelGroups | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> Engine:
        """Load this rank's part of the checkpoint at `path` (collective when layer-sharded)."""
        counter = CommCounter() if groups is not None else None
        model, report = load_model(path, cfg, groups, device=device, dtype=dtype,
                                   counter=counter, progress=progress)
        tok_file = Path(path) / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None
        return cls(model, tokenizer, stop_token_ids(path), report)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt through the checkpoint's tokenizer.json."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer.json: pass token ids instead")
        return [self.tokenizer.encode(p).ids for p in prompts]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, seed: int = 0,
                 stop_at_eos: bool = False) -> GenerationResult:
        """Batched prefill of every prompt, then one decode step per new token."""
        check_request(self.model.args, prompts, max_new_tokens)
        model, ctx = self.model, self.model.ctx
        device = model.anchor.device
        lens = [len(p) for p in prompts]
        cache = model.allocate_cache(len(prompts), max(lens) + max_new_tokens)
        gen = torch.Generator(device=device).manual_seed(seed)
        counter, series = ctx.counter, ctx.o_series
        if counter is not None:
            counter.reset()
        wait0 = series.stats().blocked_wait_s if series else 0.0
        recv0 = series.stats().bytes_received if series else 0

        self._sync()
        t0 = time.perf_counter()
        tokens = torch.tensor([t for p in prompts for t in p], device=device)
        logits = pipeline.forward(model, tokens, model.step([0] * len(lens), lens), cache)
        nxt = self._next_tokens(logits, temperature, gen, len(lens))
        self._sync()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        prefill_comm = counter.total() if counter is not None else 0
        st1 = series.stats() if series else None

        out = [nxt]  # kept on device: no host sync per step unless stopping at EOS
        done = torch.zeros(len(prompts), dtype=torch.bool)
        t1, steps = time.perf_counter(), 0
        for _ in range(max_new_tokens - 1):
            if stop_at_eos:
                done |= torch.isin(nxt.cpu(), torch.tensor(self.eos_token_ids, dtype=torch.long))
                if bool(done.all()):
                    break
            step = model.step([n + steps for n in lens], [1] * len(lens))
            logits = pipeline.forward(model, nxt, step, cache)
            nxt = self._next_tokens(logits, temperature, gen, len(lens))
            out.append(nxt)
            steps += 1
        self._sync()
        decode_ms = (time.perf_counter() - t1) * 1e3 / max(steps, 1)

        per_seq = torch.stack(out, dim=1).tolist()  # [B, new tokens]
        if stop_at_eos:
            per_seq = [_cut_after(s, self.eos_token_ids) for s in per_seq]
        total = counter.total() if counter is not None else 0
        st = series.stats() if series else None
        return GenerationResult(
            tokens=per_seq,
            text=[self.tokenizer.decode(s) for s in per_seq] if self.tokenizer else None,
            prefill_ms=prefill_ms, decode_ms_per_token=decode_ms, decode_steps=steps,
            o_proj_bytes=model.o_proj_bytes(), weight_bytes=model.weight_bytes(),
            kv_cache_bytes=cache.nbytes, comm_bytes=total,
            comm_bytes_by_op=dict(counter.bytes_sent) if counter is not None else {},
            prefill_comm_bytes=prefill_comm,
            decode_comm_bytes_per_step=(total - prefill_comm) / max(steps, 1),
            fetch_bytes_per_step=(st.bytes_received - recv0) / (steps + 1) if st else 0.0,
            blocked_wait_ms=(st.blocked_wait_s - wait0) * 1e3 if st else 0.0,
            prefill_fetch_bytes=st1.bytes_received - recv0 if st1 else 0,
            decode_fetch_bytes_per_step=(st.bytes_received - st1.bytes_received) / max(steps, 1)
            if st else 0.0,
            prefill_blocked_wait_ms=(st1.blocked_wait_s - wait0) * 1e3 if st1 else 0.0,
            decode_blocked_wait_ms_per_step=(st.blocked_wait_s - st1.blocked_wait_s) * 1e3
            / max(steps, 1) if st else 0.0,
            layers=(model.layer_range.start, model.layer_range.stop),
        )

    def _next_tokens(self, logits: Tensor | None, temperature: float, gen: torch.Generator,
                     batch: int) -> Tensor:
        """[B, V] logits of the last stage (None on the others) -> [B] ids, identical on every
        rank: broadcast from TP rank 0 of the last stage, then over the PP group."""
        groups = self.model.ctx.groups
        nxt = None
        if logits is not None:
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            else:
                nxt = logits.argmax(dim=-1)
            if groups is not None and groups.tp.group is not None:
                dist.broadcast(nxt, src=groups.tp.global_rank(0), group=groups.tp.group)
        return pipeline.share_tokens(nxt, batch, groups, self.model.anchor.device)

    def _sync(self) -> None:
        device = self.model.anchor.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        groups = self.model.ctx.groups
        if groups is not None and groups.tp.group is not None:
            dist.barrier(group=groups.tp.group)


def _cut_after(seq: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(seq):
        if t in eos:
            return seq[:i + 1]
    return seq
