"""GRPO as functions of tensors (no model, no I/O): what grpo_mm.py's loop (and so grpo_text.py's) computes.

  group_advantages  A_i = (r_i - mean_g) / (std_g + 1e-6)            (GRPO; PAPER.md "GRPO as used")
  pad_select        Prioritized Advantage Distillation               (paper Section 4.1.1, Algorithm 1)
  pad_tau           PAD's temperature, linear 1.0 -> 0.3              (Algorithm 1 step 5; Table 5's 0.3 is its end)
  policy_loss       token-level clipped ratio loss with dual clip     (PAPER.md "GRPO as used")
  kl_k3             k3 ("low_var_kl") KL to the reference            (PAPER.md "GRPO as used")
  entropy_beta      the entropy bonus's warm-up and decay             (Table 5)
Where the paper is silent or its released code differs (PAD bounds, clipping epsilons), grpo_mm.py's docstring
says which default was chosen and why.
"""

from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards (P, n) -> advantages (P, n): A_i = (r_i - mean_g) / (std_g + eps), std unbiased (over n - 1).
    A group whose rewards are all equal gives zeros."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=True, keepdim=True)
    return (rewards - mean) / (std + eps)


def pad_tau(step: int, max_steps: int, start: float = 1.0, end: float = 0.3) -> float:
    """PAD temperature, linear from `start` at step 0 to `end` at the last step (Algorithm 1, step 5)."""
    frac = step / max(1, max_steps - 1)
    return start + (end - start) * min(1.0, frac)


def pad_select(
    adv: torch.Tensor,
    mode: str,
    t_low: float,
    t_high: float,
    tau: float,
    rho: float,
    generator: torch.Generator,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Prioritized Advantage Distillation. adv (N,) -> (times_drawn (N,) long, |E|, the draws in order).

    paper (Algorithm 1): E = {i : t_low <= |A_i| <= t_high}; P(i) = softmax(|A_i| / tau) over E;
      k' = min(ceil(rho N), |E|) draws without replacement. E empty -> nothing is trained.
    released: E = {0.03 < |A| < 0.97} (strict, bounds fixed), P ~ (|A| + 1e-8)^1.5, ceil(1.5 N) draws with
      replacement; E empty -> the whole batch once.
    filter: all of E once (the zero-advantage filter). off: every sequence once (plain GRPO; |E| = N).
    `eligible` (N,) bool removes sequences before selection (truncation="mask").
    """
    n = adv.numel()
    a = adv.abs()  # compared in its own dtype: a float32 0.03 stays inside [0.03, ...]
    ok = torch.ones(n, dtype=torch.bool) if eligible is None else eligible.bool()
    drawn = torch.zeros(n, dtype=torch.long)
    if mode == "off":  # |E| is N by definition (CONTRACT), also when truncation="mask" trains fewer
        drawn[ok] = 1
        return drawn, n, ok.nonzero().flatten()
    if mode == "released":
        in_e = ok & (a > 0.03) & (a < 0.97)
    else:
        in_e = ok & (a >= t_low) & (a <= t_high)
    idx = in_e.nonzero().flatten()
    size_e = idx.numel()
    if mode == "filter":
        drawn[idx] = 1
        return drawn, size_e, idx
    if mode == "released":
        if size_e == 0:
            drawn[ok] = 1
            return drawn, 0, ok.nonzero().flatten()
        weights = (a[idx].double() + 1e-8) ** 1.5
        picks = idx[torch.multinomial(weights, math.ceil(1.5 * n), replacement=True, generator=generator)]
        drawn.index_add_(0, picks, torch.ones_like(picks))
        return drawn, size_e, picks
    if mode != "paper":
        raise ValueError(f"pad_mode must be paper, released, filter or off; got {mode!r}")
    if size_e == 0:
        return drawn, 0, idx
    logits = a[idx].double() / tau
    weights = torch.softmax(logits, 0)  # P(i) = exp(|A_i|/tau) / sum_E exp(|A_j|/tau), stable
    k = min(math.ceil(rho * n), size_e)
    # torch.multinomial without replacement draws one index at a time from the renormalised P.
    picks = idx[torch.multinomial(weights, k, replacement=False, generator=generator)]
    drawn[picks] = 1
    return drawn, size_e, picks


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
    logratio_clamp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level PPO loss (minimised), per token: (B, T) -> (loss (B, T) zero outside mask, clipped (B, T)).

    ratio = exp(clamp(logp - old_logp, -c, c));  L1 = -A ratio;  L2 = -A clip(ratio, 1 - eps_low, 1 + eps_high)
    L = max(L1, L2);  for A < 0 (dual-clip): L = min(L, c_dual |A|).
    `adv` is (B,) (one per sequence, broadcast to its tokens) or (B, T).
    """
    adv = adv[:, None] if adv.dim() == 1 else adv
    log_ratio = (logp - old_logp).clamp(-logratio_clamp, logratio_clamp)
    ratio = log_ratio.exp()
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(l1, l2)
    clipped = l2 > l1
    if dual_clip > 0:
        capped = torch.minimum(loss, -adv * dual_clip)
        neg = (adv < 0).expand_as(loss)
        clipped = clipped | (neg & (loss > -adv * dual_clip))
        loss = torch.where(neg, capped, loss)
    mask = mask.to(loss.dtype)
    return loss * mask, clipped & mask.bool()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """k3 ("low_var_kl") estimate of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1, clamped."""
    d = ref_logp - logp
    return (d.exp() - d - 1).clamp(-clamp, clamp)


def entropy_beta(step: int, beta0: float, beta_min: float, decay: float, warmup: int) -> float:
    """Entropy coefficient (Table 5): 0 for step < tau_w, then max(beta_min, beta0 * lambda^(step - tau_w))."""
    if step < warmup:
        return 0.0
    return max(beta_min, beta0 * decay ** (step - warmup))
