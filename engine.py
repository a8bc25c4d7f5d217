"""Rollouts at scale: a continuous-batching decode engine for Qwen2.5-VL, exact and bounded in memory.

`generate(model, input_ids, attention_mask, gc, ..., num_return_sequences=n, slots=S)` returns what
`sampling.generate` (and so HF `generate`) returns for the same arguments: prompt + new tokens per row, rows
prompt-major, padded with pad_token_id after their end-of-turn; the same tokens under greedy decoding, the same
sampling distribution (`sampling.sample_tokens`, temperature / top-p / suppress_tokens / min_new_tokens).
Only the schedule differs:

- **Continuous batching.** Every (prompt, sample) of the call is queued, prompt-major. `S` decode slots run at
  once; a row that samples its end-of-turn (or reaches max_new_tokens) frees its slot at once and the next
  queued sequence takes it at the next step. Free slots are filled lowest index first, so live rows pack at
  the front and the decoder runs on the slot prefix `[0, hi)` only.
- **One prefill per prompt.** The prompts that the newly admitted sequences need are prefilled together
  (`sampling.prefill`: vision tower and 3-D M-RoPE through the HF modules, left-padded), and each prompt's
  KV (its valid, unpadded part) is copied into its samples' slots. Admission is FIFO, so at most one prompt is
  ever partly admitted: its KV is kept (cloned, one prompt) until its last sample gets a slot.
- **A preallocated KV cache: per-slot static buffers**, keys and values `[S, max_len, kv_heads, head_dim]` per
  layer (max_len = the longest prompt + max_new_tokens), allocated once per call and never reallocated
  (`SlotCache`; its bytes are in `stats["kv_bytes"]`). Why not paged blocks: a slot holds one sequence from
  admission to its end, and every slot must be able to reach max_len (no preemption), so a block table would
  reserve the same worst case; paging pays off only with preemption or prefix sharing between slots, which
  this engine does not do. The price: memory is S x max_len whatever the lengths (a paged cache with
  preemption could run more slots in the same bytes on long-tailed lengths). The layout (token-major within a
  slot) is `flash_attn_with_kvcache`'s.
- **Attention reads only each row's valid cache, GQA heads not expanded.** The decoder runs through the HF
  modules (`model.model.language_model`, its decoder layers and Qwen2.5-VL attention) with a `SlotCache`
  (a transformers `Cache` whose `update` writes each row's new K/V at its own length) and the attention
  function `slot_attention`, registered with transformers' `AttentionInterface` as "revisual_slots" and
  switched on for the decode steps only: with flash-attn on CUDA `flash_attn_with_kvcache(cache_seqlens=...)`
  (each row reads exactly its own length; untested here: no GPU in this session), else sdpa over the slots'
  buffers up to the longest live row with a per-row length mask and the query heads grouped by KV head
  ((R, kv, group, D) queries against (R, kv, L, D) keys: no K/V copy per query head).
- **One host sync per decode step**: the sampled tokens (`.tolist()`) drive the bookkeeping (end of turn,
  slot release, admission); none inside the decoder. (The sampler's own top-p rejection rounds and a prefill
  add a few more: prompt lengths, image slicing, M-RoPE indices.) Lengths and the slot map live on the host,
  positions and hidden states on the device. lm_head and the sampler run on live rows only (the decoder on the
  slot prefix).
- Deterministic for the torch RNG seed and the slot count (the order of the sampler's draws depends on both;
  greedy outputs depend on neither).

- **Bounded prefill.** An admission's prompts are prefilled in parts of at most `prefill_tokens` padded tokens
  (16,384 by default), each part's KV copied into its slots before the next part runs.

What it does not do: no chunked prefill within a prompt (a prompt is prefilled whole), no preemption or swapping, no paged
blocks or prefix sharing between slots (a group's samples hold copies of the prompt's KV), no CUDA graphs, no
speculative decoding, no beam search / top-k / repetition penalty (configs that `sampling.fast_generate_supported`
rejects go to `sampling.generate`, which hands them to HF `generate`).
"""

from __future__ import annotations

import heapq

import torch
from transformers import AttentionInterface, GenerationConfig, Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import Cache, CacheLayerMixin

import sampling as S
from data import slice_pixel_values
from model import cache_kwarg

ATTENTION_NAME = "revisual_slots"
# Padded prompt tokens per prefill forward: an admission's prompts are prefilled in parts of at most this many
# (a part's activations are one layer's worth of tokens x (5 hidden + 3 MLP) values, plus its masks: 2.9 GB at
# 7B for 2 x 8k-token prompts; in-loop validation admits 16 prompts at once, 23 GB in one forward).
PREFILL_TOKENS = 16384


def prefill_parts(prompts: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """`prompts` (in order) cut into consecutive parts whose count x longest length stays within `budget`
    tokens (a prompt longer than the budget forms a part of its own)."""
    parts: list[list[int]] = []
    for p in prompts:
        if parts and (len(parts[-1]) + 1) * max(lengths[q] for q in (*parts[-1], p)) <= budget:
            parts[-1].append(p)
        else:
            parts.append([p])
    return parts


def _flash_kvcache():
    try:
        from flash_attn import flash_attn_with_kvcache

        return flash_attn_with_kvcache
    except ImportError:
        return None


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    slot_seqlens=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """One decode token per row against its slot's cache. query (R, H, 1, D); key/value (R, L, kv, D) (the slots'
    buffers up to the longest live row, `SlotCache`'s layout); attention_mask (R, 1, 1, L) bool, True for the
    row's valid positions; slot_seqlens (R,) int32 the same lengths (for flash-attn). -> (R, 1, H, D)."""
    r, h, q_len, d = query.shape
    kv = key.shape[2]
    flash = _flash_kvcache() if query.is_cuda and slot_seqlens is not None else None
    if flash is not None:  # untested in this repository's CI (no GPU): each row reads exactly its own length
        out = flash(
            query.transpose(1, 2), key, value, cache_seqlens=slot_seqlens, softmax_scale=scaling, causal=True
        )
        return out, None
    q = query.reshape(r, kv, h // kv * q_len, d)  # (R, kv, group, D): a KV head's query heads side by side
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(r, h, q_len, d).transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, slot_attention)


class SlotLayer(CacheLayerMixin):
    """One decoder layer's K/V for `slots` sequences: static (slots, max_len, kv_heads, head_dim) buffers."""

    def __init__(self, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        self.keys = torch.zeros(slots, max_len, kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.is_initialized = True
        self.write_idx: torch.Tensor | None = None  # (hi,) where each row's new token goes (set per step)
        self.read_len = 0

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states (hi, kv, 1, D): row i's new K goes to position write_idx[i] of slot i; returns the slots'
        buffers (hi, read_len, kv, D)."""
        hi = key_states.shape[0]
        rows = torch.arange(hi, device=key_states.device)
        self.keys[rows, self.write_idx] = key_states[:, :, 0]
        self.values[rows, self.write_idx] = value_states[:, :, 0]
        return self.keys[:hi, : self.read_len], self.values[:hi, : self.read_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.read_len, 0

    def get_seq_length(self) -> int:
        return self.read_len

    def get_max_length(self) -> int:
        return self.keys.shape[1]


class SlotCache(Cache):
    """The engine's KV cache: one `SlotLayer` per decoder layer, allocated once. `set_step` points every layer at
    this step's write positions and read length; `load` copies a prefilled prompt into slots."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, slots: int, max_len: int):
        tc = model.config.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        p = next(model.parameters())
        args = (slots, max_len, tc.num_key_value_heads, head_dim, p.dtype, p.device)
        super().__init__(layers=[SlotLayer(*args) for _ in range(tc.num_hidden_layers)])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

    def set_step(self, write_idx: torch.Tensor, read_len: int) -> None:
        for layer in self.layers:
            layer.write_idx, layer.read_len = write_idx, read_len

    def load(self, slots: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """kv[l] = (keys, values) of one prompt, (kv_heads, plen, D) as HF caches hold them -> positions [0, plen)
        of every slot in `slots`."""
        for layer, (k, v) in zip(self.layers, kv):
            plen = k.shape[1]
            layer.keys[slots, :plen] = k.transpose(0, 1).unsqueeze(0)
            layer.values[slots, :plen] = v.transpose(0, 1).unsqueeze(0)


class _DecodeAttention:
    """Switch the text decoder to `slot_attention` for the decode steps (prefill keeps the model's own)."""

    def __init__(self, model):
        self.config = model.model.language_model.config

    def __enter__(self):
        self.saved = self.config._attn_implementation
        self.config._attn_implementation = ATTENTION_NAME

    def __exit__(self, *exc):
        self.config._attn_implementation = self.saved


def images_per_row(input_ids: torch.Tensor, vision_start_id: int) -> list[int]:
    """How many images each prompt row holds (one <|vision_start|> per image)."""
    return (input_ids == vision_start_id).sum(-1).tolist()


def select_prompts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    row_pixels: list[torch.Tensor] | None,
    image_grid_thw: torch.Tensor | None,
    row_images: list[int],
    rows: list[int],
) -> dict:
    """A left-padded sub-batch of prompt rows, cut to its own longest prompt, with its rows' images."""
    width = int(attention_mask[rows].sum(-1).max())
    batch = {
        "input_ids": input_ids[rows, -width:],
        "attention_mask": attention_mask[rows, -width:],
        "mm_token_type_ids": mm_token_type_ids[rows, -width:],
    }
    if row_pixels is not None and sum(row_images[r] for r in rows):
        first = [sum(row_images[:r]) for r in rows]
        # the call's pixels may stay on the host (grpo_mm.rollout keeps them there): only the admitted rows'
        # images go to the device, for their prefill
        batch["pixel_values"] = torch.cat([row_pixels[r] for r in rows]).to(input_ids.device)
        images = [i for r, f in zip(rows, first) for i in range(f, f + row_images[r])]
        batch["image_grid_thw"] = image_grid_thw[images]
    return batch


@torch.no_grad()
def generate(
    model: Qwen2_5_VLForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generation_config: GenerationConfig,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    num_return_sequences: int = 1,
    slots: int = 0,
    logits_hook=None,
    stats: dict | None = None,
    prefill_tokens: int = PREFILL_TOKENS,
) -> torch.Tensor:
    """`sampling.generate`'s output for the same arguments (see the module docstring), decoded with continuous
    batching over `slots` decode slots (0: one per sequence). `stats`, when given, receives the run's numbers:
    steps (sampling steps), row_steps (rows the decoder ran, summed over steps), useful_tokens, admissions, prefills, kv_bytes, slots,
    max_len. `prefill_tokens` bounds one prefill forward (prompts x padded width; a longer prompt runs alone).
    Configs the engine does not run go to `sampling.generate` unchanged."""
    gc, n = generation_config, num_return_sequences
    if not S.fast_generate_supported(gc):
        images = (pixel_values, image_grid_thw, mm_token_type_ids)
        return S.generate(
            model, input_ids, attention_mask, gc, *images, num_return_sequences=n, logits_hook=logits_hook
        )
    device = input_ids.device
    cfg = model.config
    eos_ids = gc.eos_token_id if isinstance(gc.eos_token_id, (list, tuple)) else [gc.eos_token_id]
    eos_set, eos = set(eos_ids), torch.tensor(eos_ids, device=device)
    pad_id = gc.pad_token_id if gc.pad_token_id is not None else eos_ids[0]
    suppress = torch.tensor(list(gc.suppress_tokens or []), dtype=torch.long, device=device)
    temperature = gc.temperature if gc.temperature is not None else 1.0
    top_p = gc.top_p if gc.top_p is not None else 1.0
    max_new, min_new = gc.max_new_tokens, gc.min_new_tokens or 0
    if mm_token_type_ids is None:
        mm_token_type_ids = (input_ids == cfg.image_token_id).int()
    has_images = pixel_values is not None and pixel_values.numel() > 0
    row_images = images_per_row(input_ids, cfg.vision_start_token_id)
    row_pixels = slice_pixel_values(pixel_values, image_grid_thw, row_images) if has_images else None
    plen = attention_mask.sum(-1).tolist()
    num_seqs = len(plen) * n
    slots = min(slots or num_seqs, num_seqs)
    max_len = max(plen) + max_new
    cache = SlotCache(model, slots, max_len)
    param_dtype = next(model.parameters()).dtype
    hidden_buf = torch.zeros(slots, cfg.text_config.hidden_size, dtype=param_dtype, device=device)
    pos = torch.zeros(slots, dtype=torch.long, device=device)  # the next token's M-RoPE position, per slot
    feed = torch.full((slots,), pad_id, dtype=torch.long, device=device)
    lm, cache_kw = model.model.language_model, cache_kwarg(model.model.language_model)
    # Host bookkeeping: per slot the sequence it holds (-1: free), its cache length and its new-token count.
    seq_of, length, steps = [-1] * slots, [0] * slots, [0] * slots
    free = list(range(slots))
    out_tokens: list[list[int]] = [[] for _ in range(num_seqs)]
    next_seq = 0
    # prompt -> its prefilled KV, hidden state and position, until all n admitted
    pending: dict[int, dict] = {}
    st = dict(steps=0, row_steps=0, useful_tokens=0, admissions=0, prefills=0)
    st.update(kv_bytes=cache.nbytes, slots=slots, max_len=max_len)
    while True:
        # Admission: the next queued sequences into the free slots (lowest first); the prompts they need are
        # prefilled in parts of at most `prefill_tokens` padded tokens, each part's KV copied into its slots.
        take = min(len(free), num_seqs - next_seq)
        if take:
            by_prompt: dict[int, list[int]] = {}
            for s in range(next_seq, next_seq + take):
                slot = heapq.heappop(free)
                seq_of[slot], length[slot], steps[slot] = s, plen[s // n], 0
                by_prompt.setdefault(s // n, []).append(slot)
            next_seq += take
            need = sorted(by_prompt.keys() - pending.keys())
            parts = [[p for p in by_prompt if p in pending], *prefill_parts(need, plen, prefill_tokens)]
            for part in parts:  # first the partly admitted prompt of the last admission, if any
                if part and part[0] in need:
                    batch = select_prompts(
                        input_ids,
                        attention_mask,
                        mm_token_type_ids,
                        row_pixels,
                        image_grid_thw,
                        row_images,
                        part,
                    )
                    h, pcache, npos = S.prefill(model, **batch)
                    width = batch["input_ids"].shape[1]
                    for i, p in enumerate(part):
                        kv = [
                            (layer.keys[i, :, width - plen[p] :], layer.values[i, :, width - plen[p] :])
                            for layer in pcache.layers
                        ]
                        pending[p] = dict(kv=kv, h=h[i], pos=npos[i], left=n)
                    st["prefills"] += len(part)
                    del batch, h, pcache
                for p in part:
                    entry, idx = pending[p], torch.tensor(by_prompt[p], device=device)
                    cache.load(idx, entry["kv"])
                    hidden_buf[idx] = entry["h"]
                    pos[idx] = entry["pos"]
                    entry["left"] -= len(by_prompt[p])
                    if entry["left"] == 0:
                        del pending[p]
                    else:  # the one partly admitted prompt: keep its own KV, not the prefill batch's
                        entry["kv"] = [(k.clone(), v.clone()) for k, v in entry["kv"]]
            st["admissions"] += take
        live = [i for i in range(slots) if seq_of[i] >= 0]
        if not live:
            break
        # Sample one token for every live row (lm_head and the sampler on live rows only).
        rows = torch.tensor(live, device=device)
        logits = model.lm_head(hidden_buf[rows]).float()
        if suppress.numel():
            logits.index_fill_(1, suppress, -float("inf"))
        if min_new and any(steps[i] < min_new for i in live):
            early = torch.tensor([steps[i] < min_new for i in live], device=device)
            logits[:, eos] = logits[:, eos].masked_fill(early[:, None], -float("inf"))
        if logits_hook is not None:
            logits = logits_hook(
                torch.tensor([seq_of[i] for i in live], device=device),
                torch.tensor([steps[i] for i in live], device=device),
                logits,
            )
        tok = S.sample_tokens(logits, temperature, top_p) if gc.do_sample else logits.argmax(-1)
        feed[rows] = tok
        cont = []
        for i, t in zip(live, tok.tolist()):  # the step's one host sync
            out_tokens[seq_of[i]].append(t)
            steps[i] += 1
            if t in eos_set or steps[i] == max_new:
                seq_of[i] = -1
                heapq.heappush(free, i)
            else:
                cont.append(i)
        st["useful_tokens"] += len(live)
        st["steps"] += 1
        if not cont:
            continue
        # Decode: the slot prefix [0, hi) through the HF decoder; each row writes its K/V at its own length and
        # reads its own valid cache. Free rows in the prefix compute garbage that nothing reads.
        hi = cont[-1] + 1
        read_len = max(length[i] for i in cont) + 1
        write_idx = torch.tensor(length[:hi], device=device)
        cache.set_step(write_idx, read_len)
        mask = (torch.arange(read_len, device=device) <= write_idx[:, None]).view(hi, 1, 1, read_len)
        with _DecodeAttention(model):
            h = lm(
                input_ids=feed[:hi, None],
                position_ids=pos[:hi].view(1, hi, 1).expand(3, hi, 1),
                attention_mask={"full_attention": mask},
                use_cache=True,
                slot_seqlens=(write_idx + 1).int(),
                **{cache_kw: cache},
            ).last_hidden_state
        hidden_buf[:hi] = h[:, 0]
        pos[:hi] += 1
        for i in cont:
            length[i] += 1
        st["row_steps"] += hi
    if stats is not None:
        stats.update(st)
    width = max(len(t) for t in out_tokens)
    new = torch.full((num_seqs, width), pad_id, dtype=torch.long, device=device)
    for s, t in enumerate(out_tokens):
        new[s, : len(t)] = torch.tensor(t, dtype=torch.long)
    return torch.cat([input_ids.repeat_interleave(n, 0), new], dim=1)
