"""Rollout sampling: complete generation configs and our own decode loop for Qwen2.5-VL.

- `generation_config(tokenizer, temperature, top_p, max_new_tokens)`: the only generation config rollouts and evals
  use; nothing is merged in from the checkpoint's generation_config.json (PITFALLS: the Instruct checkpoints'
  top_k=1 / repetition_penalty=1.05 would make every rollout of a group identical).
- `generate(model, input_ids, attention_mask, gc, ..., num_return_sequences=n)`: the output and sampling
  distribution of HF `generate` for these configs, in our own loop: `sample_tokens` (exact temperature + top-p
  sampling without sorting the vocabulary at every step) and one prefill per group of n samples. Any config it
  does not implement is handed to HF `generate` unchanged.
- `split_completion`: generated ids -> the completion up to its end-of-turn token, and whether it was truncated.

On a sharded model, call these inside `sharding.gathered_for_generation(policy)` (no collective per token).
"""

from __future__ import annotations

import functools
import math

import torch
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

from model import VISION_TOKENS, cache_kwarg, output_cache
from policy import position_ids_for


def generation_config(tokenizer, temperature: float, top_p: float, max_new_tokens: int) -> GenerationConfig:
    """A complete generation config (temperature 0 = greedy). Nothing may be filled in from the checkpoint's own
    generation_config.json, whose top_k=1 / repetition_penalty=1.05 would make every rollout of a group
    identical (PITFALLS); vision special tokens are never sampled. Greedy decoding gives the sampling fields
    transformers' own defaults (temperature 1, top_p 1, top_k 50): left unset, HF `generate` would fill them in
    from the checkpoint's file; set to anything else, it warns that they are not valid without sampling."""
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    common = dict(repetition_penalty=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos)
    common.update(pad_token_id=tokenizer.pad_token_id, suppress_tokens=vision_special_ids(tokenizer))
    if temperature > 0:
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)
    return GenerationConfig(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, **common)


def split_completion(ids: list[int], eos_ids) -> tuple[list[int], bool]:
    """Generated ids -> (the completion up to and including its first end-of-turn token, truncated?)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], False
    return ids, True


def vision_special_ids(tokenizer) -> list[int]:
    """Token ids that must never be sampled (PITFALLS: a sampled <|image_pad|> breaks the next forward)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]


# ----------------------------------------------------------------------------------------------------------
# Rollout generation without HF's per-step vocabulary sort: an exact top-p sampler and a decode loop


@functools.lru_cache(maxsize=16)
def _block_size(vocab: int) -> int:
    """A divisor of `vocab` near 2 sqrt(vocab) (the two-level inverse CDF below); 0 when none is usable."""
    divisors = [d for d in range(8, vocab // 8 + 1) if vocab % d == 0]
    return min(divisors, key=lambda d: (abs(math.log(d / (2 * vocab**0.5))), d)) if divisors else 0


def _inverse_cdf_draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of `probs` (B, V), non-negative and unnormalised, drawn with probability proportional to
    it: u ~ U(0, total), then the first index whose cumulative mass exceeds u. Two levels (block sums, their
    cumsum in fp64, then a cumsum inside the chosen block only) cost one pass over V rather than HF's sort and
    avoid the drift of one fp32 cumsum over 151k entries; a draw can land on a zero-probability index only
    through rounding (the caller rejects those)."""
    b, v = probs.shape
    blk = _block_size(v)
    if blk == 0:  # prime-sized vocabulary: pad to a multiple of 64 with zero mass
        blk, pad = 64, -v % 64
        probs = torch.nn.functional.pad(probs, (0, pad))
    nb = probs.shape[1] // blk
    blocks = probs.view(b, nb, blk)
    csum = blocks.sum(-1).double().cumsum(-1)  # (B, nb)
    u = torch.rand(b, 1, dtype=torch.float64, device=probs.device) * csum[:, -1:]
    bi = torch.searchsorted(csum, u, right=True).clamp_(max=nb - 1)  # (B, 1) block of the draw
    below = torch.where(bi > 0, csum.gather(1, (bi - 1).clamp(min=0)), torch.zeros_like(u))
    inner = blocks.gather(1, bi[:, :, None].expand(b, 1, blk)).squeeze(1).double().cumsum(-1)  # (B, blk)
    j = torch.searchsorted(inner, u - below, right=True).clamp_(max=blk - 1)
    return (bi * blk + j).squeeze(1).clamp_(max=v - 1)


def sample_tokens(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, max_rounds: int = 16
) -> torch.Tensor:
    """One token per row of `logits` (B, V), from softmax(logits / temperature) restricted to the top-p nucleus and
    renormalised: the distribution of HF `generate`'s TemperatureLogitsWarper -> TopPLogitsWarper -> softmax ->
    multinomial (a token is in the nucleus iff the tokens strictly more likely than it hold < top_p of the mass;
    the most likely token always is; -inf logits are never drawn). Uses the global torch RNG.

    HF sorts the whole vocabulary at every step (about 0.5 s for 32 x 151k on two CPU cores) and draws with an
    exponential race over V. Here: an inverse-CDF draw from the full distribution, then rejection: a draw outside
    the nucleus is drawn again (each round accepts with probability = the nucleus mass >= top_p; rows still
    rejected after `max_rounds` take HF's sort). Exactness: tests/test_bench.py compares it with HF's warpers."""
    probs = torch.softmax(logits.float() / temperature if temperature != 1.0 else logits.float(), dim=-1)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = None  # None: all rows (no copy of the (B, V) probabilities in the common first round)
    for _ in range(max_rounds):
        p = probs if rows is None else probs[rows]
        tok = _inverse_cdf_draw(p)
        p_tok = p.gather(1, tok[:, None])
        ok = p_tok.squeeze(1) > 0
        if top_p < 1.0:  # in the nucleus iff the tokens strictly more likely hold < top_p of the mass
            check = ok & (p_tok.squeeze(1) <= 1 - top_p)  # p_tok > 1 - top_p settles it without a pass over V
            if bool(check.all()):
                ok = (p * (p > p_tok)).sum(-1) < top_p
            elif bool(check.any()):
                pc, tc = p[check], p_tok[check]
                ok[check] = (pc * (pc > tc)).sum(-1) < top_p
        idx = torch.arange(probs.shape[0], device=probs.device) if rows is None else rows
        out[idx[ok]] = tok[ok]
        rows = idx[~ok]
        if rows.numel() == 0:
            return out
    p = probs[rows]  # the rare leftovers: HF's own nucleus (sort) and multinomial
    sorted_p, order = torch.sort(p, descending=False)
    drop = sorted_p.cumsum(-1) <= (1 - top_p)
    drop[:, -1] = False
    p = p.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    out[rows] = torch.multinomial(p, 1).squeeze(1)
    return out


@torch.no_grad()
def prefill(
    model: Qwen2_5_VLForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, object, torch.Tensor]:
    """One forward over left-padded prompts (vision tower and 3-D M-RoPE through the HF modules) -> (the last
    position's hidden state (B, H) after the final norm, the HF KV cache, next_pos (B,)). Every new token sits one
    past its prompt's largest M-RoPE position, on all three axes, as in HF generate; `model.lm_head(hidden)` gives
    the first new token's logits."""
    if mm_token_type_ids is None:
        mm_token_type_ids = (input_ids == model.config.image_token_id).int()
    has_images = pixel_values is not None and pixel_values.numel() > 0
    pixels, grid = (pixel_values, image_grid_thw) if has_images else (None, None)
    pos = position_ids_for(model, input_ids, attention_mask, grid, mm_token_type_ids)
    next_pos = pos.masked_fill(attention_mask[None] == 0, -1).amax(dim=(0, 2)) + 1  # (B,)
    images = dict(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm_token_type_ids)
    out = model.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True, **images
    )
    return out.last_hidden_state[:, -1], output_cache(out), next_pos


# GenerationConfig fields that `generate` below implements; any other field away from its default sends the call to
# HF `generate` (beam search, top-k, repetition penalty, min_p, ... are not reimplemented).
_DEFAULT_OK = {  # field -> the values at which it changes nothing (None: unset)
    **dict.fromkeys("num_beams num_return_sequences".split(), (None, 1)),
    **dict.fromkeys("top_k no_repeat_ngram_size min_length".split(), (None, 0)),
    **dict.fromkeys(
        "repetition_penalty typical_p encoder_repetition_penalty guidance_scale".split(), (None, 1.0)
    ),
    **dict.fromkeys("epsilon_cutoff eta_cutoff diversity_penalty".split(), (None, 0.0)),
    **dict.fromkeys("return_dict_in_generate output_scores output_logits".split(), (None, False)),
    **dict.fromkeys("renormalize_logits low_memory".split(), (None, False)),
    **dict.fromkeys("use_cache".split(), (None, True)),
    **dict.fromkeys("min_p top_h bad_words_ids forced_bos_token_id forced_eos_token_id".split(), (None,)),
    **dict.fromkeys("begin_suppress_tokens sequence_bias exponential_decay_length_penalty".split(), (None,)),
    **dict.fromkeys("stop_strings prompt_lookup_num_tokens assistant_early_exit".split(), (None,)),
    **dict.fromkeys("cache_implementation watermarking_config penalty_alpha max_time".split(), (None,)),
}


def fast_generate_supported(gc: GenerationConfig) -> bool:
    """Whether `generate` runs `gc` in its own loop (else it hands the call to HF `generate`)."""
    if gc.max_new_tokens is None or gc.eos_token_id is None:
        return False
    sampling_only = set() if gc.do_sample else {"top_k"}  # greedy: top_k changes nothing
    return all(getattr(gc, k, None) in ok for k, ok in _DEFAULT_OK.items() if k not in sampling_only)


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
    synced_gpus: bool = False,
    use_hf: bool = False,
    logits_hook=None,
) -> torch.Tensor:
    """`model.generate(input_ids, attention_mask, ..., generation_config=gc)` for rollouts, in our own decode loop:
    the same output (prompt + new tokens, rows padded with pad_token_id after their end-of-turn; as many columns
    as the longest row needed) and the same sampling distribution (`sample_tokens`; greedy when
    do_sample=False), honouring temperature, top_p, max_new_tokens, min_new_tokens, eos/pad ids and
    suppress_tokens. Only `gc` counts: nothing is merged in from the checkpoint's generation_config.json.

    `num_return_sequences=n` (left-padded prompts, each once): the prompts are prefilled once (the vision tower
    and the prompt's forward run once per prompt, not once per sample) and the KV cache is repeated n times;
    output rows are prompt-major (prompt 0's n samples first), as `[p for p in prompts for _ in range(n)]`.
    Anything else in `gc` (beam search, top-k, repetition penalty, ...), `synced_gpus=True` or `use_hf=True`
    goes to HF `generate` unchanged (with n > 1: `num_return_sequences`, each prompt expanded before the
    prefill).

    `logits_hook(seq, step, logits) -> logits` (benchmarks and tests only) sees each step's (B, V) logits before
    sampling, with the rows' output indices and new-token counts; engine.generate takes the same hook."""
    gc, n = generation_config, num_return_sequences
    if use_hf or synced_gpus or not fast_generate_supported(gc):
        extra = dict(
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids
        )
        extra = {k: v for k, v in extra.items() if v is not None}
        if n > 1:
            gc = GenerationConfig.from_dict({**gc.to_dict(), "num_return_sequences": n})
        extra.update(generation_config=gc, synced_gpus=synced_gpus)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **extra)
    device = input_ids.device
    eos_ids = gc.eos_token_id if isinstance(gc.eos_token_id, (list, tuple)) else [gc.eos_token_id]
    eos = torch.tensor(eos_ids, device=device)
    pad_id = gc.pad_token_id if gc.pad_token_id is not None else eos_ids[0]
    suppress = torch.tensor(list(gc.suppress_tokens or []), dtype=torch.long, device=device)
    temperature = gc.temperature if gc.temperature is not None else 1.0
    top_p = gc.top_p if gc.top_p is not None else 1.0
    max_new, min_new = gc.max_new_tokens, gc.min_new_tokens or 0
    hidden, cache, next_pos = prefill(
        model, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids
    )
    cache_kw = cache_kwarg(model)
    logits = model.lm_head(hidden).float()
    if n > 1:
        cache.batch_repeat_interleave(n)
        input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        logits, next_pos = logits.repeat_interleave(n, 0), next_pos.repeat_interleave(n, 0)
    b, prompt_len = input_ids.shape
    new = torch.full((b, max_new), pad_id, dtype=torch.long, device=device)
    mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new)], dim=1)
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    steps = 0
    for k in range(max_new):
        if suppress.numel():
            logits.index_fill_(1, suppress, -float("inf"))
        if k < min_new:
            logits.index_fill_(1, eos, -float("inf"))
        if logits_hook is not None:
            logits = logits_hook(torch.arange(b, device=device), torch.full((b,), k, device=device), logits)
        tok = sample_tokens(logits, temperature, top_p) if gc.do_sample else logits.argmax(-1)
        tok = torch.where(unfinished, tok, pad_id)
        new[:, k] = tok
        steps = k + 1
        unfinished &= ~torch.isin(tok, eos)
        if k == max_new - 1 or not bool(unfinished.any()):
            break
        step_pos = (next_pos + k).view(1, b, 1).expand(3, b, 1)
        step = {"position_ids": step_pos, "use_cache": True, cache_kw: cache}
        out = model(input_ids=tok[:, None], attention_mask=mask[:, : prompt_len + k + 1], **step)
        logits = out.logits[:, -1].float()
        del out
    return torch.cat([input_ids, new[:, :steps]], dim=1)
