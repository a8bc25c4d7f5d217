"""grpo_mm.py's math as functions of tensors, checked against values worked out by hand and an independent
per-token reference; plus the rollout trap config and the tokens the update actually trains on."""

import math

import pytest
import torch

import data as D
import grpo
import grpo_mm as G
import model as M
import policy as P
import sampling as S

# ---------------------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_k_of_n_by_hand():
    # 2 of 8 correct: mean 0.25, unbiased std sqrt((2 * 0.75^2 + 6 * 0.25^2) / 7) = sqrt(1.5 / 7) = 0.462910
    r = torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0]])
    a = grpo.group_advantages(r)
    std = math.sqrt(1.5 / 7)
    assert a[0, 0].item() == pytest.approx(0.75 / (std + 1e-6), abs=1e-6)  # 1.620185
    assert a[0, 2].item() == pytest.approx(-0.25 / (std + 1e-6), abs=1e-6)  # -0.540062
    assert a[0, 0].item() == pytest.approx(1.620185, abs=1e-5)
    # 4 of 8: +-0.5 / sqrt(2/7) = +-0.935414
    a4 = grpo.group_advantages(torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))
    assert a4[0, 0].item() == pytest.approx(0.935414, abs=1e-5)


def test_group_advantages_all_equal_gives_zero_and_groups_are_independent():
    r = torch.tensor([[0.9, 0.9, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    a = grpo.group_advantages(r)
    assert torch.equal(a[:2], torch.zeros(2, 4))
    assert a[2].sum().abs() < 1e-6 and a[2, 0] > 0


# ---------------------------------------------------------------------------------------------------------
# PAD


def test_pad_bounds_inclusive_and_k_prime():
    adv = torch.tensor([0.0, 0.03, 0.5, 1.0, 1.5, 2.0, -0.03, -1.5, 0.02, 0.0])
    g = torch.Generator().manual_seed(0)
    # E = {|A| in [0.03, 1.5]} = indices 1, 2, 3, 4, 6, 7 (both bounds inclusive, as in the paper)
    drawn, size_e, picks = grpo.pad_select(adv, "paper", 0.03, 1.5, tau=1.0, rho=0.3, generator=g)
    assert size_e == 6
    assert len(picks) == math.ceil(0.3 * 10) == 3  # k' = min(ceil(rho N), |E|)
    assert set(picks.tolist()) <= {1, 2, 3, 4, 6, 7}
    assert len(set(picks.tolist())) == 3 and drawn.max() == 1  # without replacement
    # rho large: k' = |E|, every member of E once
    drawn, size_e, picks = grpo.pad_select(adv, "paper", 0.03, 1.5, tau=1.0, rho=1.0, generator=g)
    assert sorted(picks.tolist()) == [1, 2, 3, 4, 6, 7] and drawn.sum() == 6


def test_pad_empty_set_skips_update():
    adv = torch.zeros(8)
    drawn, size_e, picks = grpo.pad_select(adv, "paper", 0.03, math.inf, 1.0, 0.5, torch.Generator())
    assert size_e == 0 and drawn.sum() == 0 and len(picks) == 0


def test_pad_first_draw_follows_softmax_of_abs_advantage_over_tau():
    adv = torch.tensor([0.0, 0.5, -1.0, 2.0, 0.2])
    tau = 0.5
    e = [1, 2, 3, 4]  # index 0 has |A| = 0 < T_low
    expect = torch.softmax(torch.tensor([0.5, 1.0, 2.0, 0.2]) / tau, 0)
    g = torch.Generator().manual_seed(1)
    trials = 20000
    counts = torch.zeros(5)
    for _ in range(trials):
        _, _, picks = grpo.pad_select(adv, "paper", 0.03, math.inf, tau, 0.4, g)
        counts[picks[0]] += 1
    freq = counts[e] / trials
    se = (expect * (1 - expect) / trials).sqrt()
    assert counts[0] == 0
    assert ((freq - expect).abs() < 4 * se + 1e-3).all(), (freq, expect)


def test_pad_modes_filter_off_released():
    adv = torch.tensor([0.0, 0.5, -1.2, 0.96, 0.97])
    g = torch.Generator().manual_seed(0)
    drawn, size_e, _ = grpo.pad_select(adv, "filter", 0.03, math.inf, 1.0, 0.5, g)
    assert drawn.tolist() == [0, 1, 1, 1, 1] and size_e == 4
    drawn, size_e, _ = grpo.pad_select(adv, "off", 0.03, math.inf, 1.0, 0.5, g)
    assert drawn.tolist() == [1] * 5 and size_e == 5
    # released: 0.03 < |A| < 0.97 strictly -> {1, 3}; ceil(1.5 N) = 8 draws with replacement
    drawn, size_e, picks = grpo.pad_select(adv, "released", 0.03, math.inf, 1.0, 0.5, g)
    assert size_e == 2 and drawn.sum() == 8 and set(picks.tolist()) <= {1, 3}
    drawn, size_e, _ = grpo.pad_select(torch.zeros(4), "released", 0.03, math.inf, 1.0, 0.5, g)
    assert size_e == 0 and drawn.tolist() == [1, 1, 1, 1]  # released code falls back to the full batch
    eligible = torch.tensor([True, True, False, True, True])
    drawn, size_e, _ = grpo.pad_select(adv, "filter", 0.03, math.inf, 1.0, 0.5, g, eligible)
    assert drawn.tolist() == [0, 1, 0, 1, 1]
    # off + truncation="mask": the truncated one is not trained, and |E| is still N (CONTRACT: pad_effective)
    drawn, size_e, _ = grpo.pad_select(adv, "off", 0.03, math.inf, 1.0, 0.5, g, eligible)
    assert drawn.tolist() == [1, 1, 0, 1, 1] and size_e == 5


def test_pad_tau_linear_schedule():
    assert grpo.pad_tau(0, 200) == 1.0
    assert grpo.pad_tau(199, 200) == pytest.approx(0.3)
    assert grpo.pad_tau(99, 199) == pytest.approx(0.65)


# ---------------------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize(
    "adv,ratio,expect,clipped",
    [
        (1.0, 1.5, -1.25, True),  # L1 = -1.5, L2 = -1 * 1.25: max = -1.25 (clip-higher at 1 + 0.25)
        (1.0, 0.5, -0.5, False),  # L1 = -0.5, L2 = -0.8: max = -0.5 (no clip below for A > 0)
        (1.0, 1.1, -1.1, False),  # inside the range
        (-1.0, 1.5, 1.5, False),  # L1 = 1.5, L2 = 1.25: max = 1.5; dual cap 3 not reached
        (-1.0, 0.5, 0.8, True),  # L1 = 0.5, L2 = 0.8 (clip at 1 - 0.2): max = 0.8
        (-1.0, 5.0, 3.0, True),  # L1 = 5, L2 = 1.25: max = 5; dual-clip min(5, 3 * |A|) = 3
        (-2.0, 2.0, 4.0, False),  # L1 = 4, L2 = 2.5: max 4 < 3 * 2 = 6
    ],
)
def test_policy_loss_by_hand(adv, ratio, expect, clipped):
    logp = torch.tensor([[math.log(ratio)]])
    loss, was_clipped = grpo.policy_loss(
        logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), 0.2, 0.25, 3.0, math.log(1e3)
    )
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert bool(was_clipped.item()) == clipped


def test_policy_loss_masks_and_logratio_clamp():
    logp = torch.tensor([[20.0, 0.0]])  # ratio e^20 clamps to 1e3
    mask = torch.tensor([[1.0, 0.0]])
    loss, _ = grpo.policy_loss(
        logp, torch.zeros(1, 2), torch.tensor([-1.0]), mask, 0.2, 0.25, 0.0, math.log(1e3)
    )
    assert loss[0, 0].item() == pytest.approx(1e3, rel=1e-4)  # no dual clip: -A * 1e3
    assert loss[0, 1].item() == 0.0


def test_kl_k3_by_hand():
    # logp = ln 0.5, ref = ln 0.25: d = ln 0.5; e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    kl = grpo.kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert kl.item() == pytest.approx(0.193147, abs=1e-6)
    assert grpo.kl_k3(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0
    assert grpo.kl_k3(torch.tensor([0.0]), torch.tensor([30.0])).item() == 10.0  # clamped


def test_entropy_schedule_by_hand():
    kw = dict(beta0=0.02, beta_min=0.0, decay=0.985, warmup=140)
    assert grpo.entropy_beta(0, **kw) == 0.0
    assert grpo.entropy_beta(139, **kw) == 0.0
    assert grpo.entropy_beta(140, **kw) == pytest.approx(0.02)
    assert grpo.entropy_beta(141, **kw) == pytest.approx(0.0197)
    assert grpo.entropy_beta(150, **kw) == pytest.approx(0.02 * 0.985**10)
    assert grpo.entropy_beta(10_000, beta0=0.02, beta_min=0.001, decay=0.985, warmup=140) == 0.001


def reference_loss(logp, old, ref, ent, adv, mask, kl_coef, beta, eps_low, eps_high, c, clamp):
    """PAPER.md's formulas, one token at a time in plain Python control flow (no shared code with grpo_mm)."""
    total, count = 0.0, 0
    for b in range(logp.shape[0]):
        a = float(adv[b])
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            lr = logp[b, t] - old[b, t]
            lr = torch.clamp(lr, -clamp, clamp)
            ratio = torch.exp(lr)
            l1 = -a * ratio
            l2 = -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            term = l1 if l1 >= l2 else l2
            if a < 0 and term > c * abs(a):
                term = term * 0 + c * abs(a)
            d = ref[b, t] - logp[b, t]
            kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
            total = total + term + kl_coef * kl - beta * ent[b, t]
            count += 1
    return total / count


def test_loss_and_gradient_match_per_token_reference():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 6
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.4).requires_grad_()
    ref = old + torch.randn(B, T, generator=g) * 0.3
    ent = (torch.rand(B, T, generator=g) * 2).requires_grad_()
    adv = torch.tensor([1.3, -0.7, -2.0])
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 5] = 0
    args = dict(kl_coef=0.01, beta=0.02)
    pg, _ = grpo.policy_loss(logp, old, adv, mask, 0.2, 0.25, 3.0, math.log(1e3))
    per_token = pg + args["kl_coef"] * grpo.kl_k3(logp, ref) * mask - args["beta"] * ent * mask
    ours = per_token.sum() / mask.sum()
    g_ours = torch.autograd.grad(ours, (logp, ent))
    theirs = reference_loss(
        logp, old, ref, ent, adv, mask, eps_low=0.2, eps_high=0.25, c=3.0, clamp=math.log(1e3), **args
    )
    g_ref = torch.autograd.grad(theirs, (logp, ent))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-7)


def test_small_case_by_hand():
    # Two tokens of one sequence, A = +1, no KL, no entropy:
    #   token 1: ratio = e^0.5 = 1.6487 > 1.25 -> clipped: loss -1.25, gradient 0
    #   token 2: ratio = e^-0.1 = 0.904837 -> loss -0.904837, d/dlogp = -ratio = -0.904837
    # mean over 2 tokens: (-1.25 - 0.904837) / 2 = -1.077419; gradients (0, -0.452419)
    logp = torch.tensor([[0.5, -0.1]], requires_grad=True)
    pg, clipped = grpo.policy_loss(
        logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.25, 3.0, 7.0
    )
    loss = pg.sum() / 2
    loss.backward()
    assert loss.item() == pytest.approx(-1.077419, abs=1e-6)
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.452419], abs=1e-6)
    assert clipped.tolist() == [[True, False]]


def test_balance_over_ranks():
    parts = G.balance_over_ranks([40, 10, 10, 10, 10], 2)
    assert parts == [[0], [1, 2, 3, 4]]
    parts = G.balance_over_ranks([5, 9, 3, 7], 2)
    assert sorted(sum(parts, [])) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# rollouts and the update on the tiny model


def _records(tmp_path):
    from conftest import make_image

    img = make_image(str(tmp_path / "a.png"))
    return [
        D.Record(id="m", problem="How many circles?", answer="2", images=[img], source="t:1"),
        D.Record(id="t", problem="What is 2 plus 3?", answer="5", source="t:2"),
    ]


@pytest.mark.parametrize("hf_generate", [False, True])
def test_rollouts_of_a_group_differ_despite_trap_config(tiny, tmp_path, hf_generate):
    """Both rollout engines (sampling.py's decode loop, HF `generate` with num_return_sequences) get the complete
    config: a group's samples differ and no vision special token is sampled."""
    m, p = tiny
    recs = _records(tmp_path)
    prompts = [D.encode_prompt(r, p) for r in recs]
    cfg = G.GRPOConfig(group_size=4, max_new_tokens=8, rollout_micro_batch=2, hf_generate=hf_generate)
    samples = G.rollout(m, p, prompts, [0, 1], cfg, seed=0)
    assert len(samples) == 8
    for g in range(2):
        group = [tuple(s.completion) for s in samples[g * 4 : (g + 1) * 4]]
        assert len(set(group)) > 1, (
            "all rollouts of a group are identical: the checkpoint's top_k=1 leaked in"
        )
    # The control: what the checkpoint's own generation config does to a group.
    b = D.collate_prompts([prompts[1]] * 4, p.tokenizer.pad_token_id, m.config.image_token_id)
    plain = m.generate(**b, max_new_tokens=8)
    assert len({tuple(r) for r in plain.tolist()}) == 1
    bad = set(S.vision_special_ids(p.tokenizer))
    assert not any(t in bad for s in samples for t in s.completion)


def test_rollout_seed_determinism(tiny, tmp_path):
    m, p = tiny
    prompts = [D.encode_prompt(r, p) for r in _records(tmp_path)]
    cfg = G.GRPOConfig(group_size=3, max_new_tokens=6)
    a = G.rollout(m, p, prompts, [0, 1], cfg, seed=5)
    b = G.rollout(m, p, prompts, [0, 1], cfg, seed=5)
    c = G.rollout(m, p, prompts, [0, 1], cfg, seed=6)
    assert [s.completion for s in a] == [s.completion for s in b] != [s.completion for s in c]


def test_update_trains_exactly_the_kept_tokens(tiny, tmp_path, monkeypatch):
    _, p = tiny
    m = M.build_tiny("tiny", seed=0)[0]
    recs = _records(tmp_path)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):
        im_end = p.tokenizer.convert_tokens_to_ids("<|im_end|>")
        comp = torch.randint(0, 200, (3 + i,), generator=g).tolist() + [im_end]
        samples.append(G.Sample(rec=i % 2, completion=comp, text="", truncated=False))
    adv = grpo.group_advantages(torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]])).flatten()
    drawn, _, _ = grpo.pad_select(adv, "paper", 0.03, math.inf, 1.0, 0.25, g)
    for s, a, k in zip(samples, adv.tolist(), drawn.tolist()):
        s.advantage, s.times_drawn = a, k
    kept = [s for s in samples if s.times_drawn]
    assert len(kept) == 2  # ceil(0.25 * 8) = 2 drawn from the 4 non-zero advantages
    encoded = {i: D.encode_prompt(r, p) for i, r in enumerate(recs)}
    policy = P.Policy(m)
    seen = {"tokens": 0, "targets": 0, "forwards": 0}
    real_forward = P.Policy.forward

    def counting(self, input_ids, attention_mask, target_mask, *a, **k):
        seen["tokens"] += int(attention_mask.sum())
        seen["targets"] += int(target_mask.sum())
        seen["forwards"] += 1
        return real_forward(self, input_ids, attention_mask, target_mask, *a, **k)

    monkeypatch.setattr(P.Policy, "forward", counting)
    cfg = G.GRPOConfig(mini_batch=64, micro_batch=1, entropy_warmup=0)
    params = [q for q in policy.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = [q.detach().clone() for q in params]
    from common import Dist

    context = (recs, encoded, p, D.REASONING_PROMPT, "system")
    gen = torch.Generator().manual_seed(0)
    stats = G.update(policy, None, samples, *context, cfg, Dist(), 0.02, gen, params, opt)
    assert stats["updates"] == 1
    assert seen["forwards"] == 2  # one micro-batch per kept sequence, no old-logprob pass for a single update
    assert seen["targets"] == sum(len(s.completion) for s in kept)
    assert seen["tokens"] == sum(len(encoded[s.rec].input_ids) + len(s.completion) for s in kept)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_non_finite_update_is_skipped_and_the_run_goes_on(tiny, tmp_path):
    """A NaN reaching the loss (here a NaN advantage) never reaches the weights or AdamW's moments: the update is
    skipped and counted, the next finite update steps as usual, and `max_bad_steps` in a row stop the run."""
    from common import Dist, NonFiniteError

    _, p = tiny
    m = M.build_tiny("tiny", seed=0)[0]
    recs = _records(tmp_path)
    encoded = {i: D.encode_prompt(r, p) for i, r in enumerate(recs)}
    im_end = p.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def batch(nan: bool) -> list:
        out = []
        for i in range(4):
            s = G.Sample(rec=i % 2, completion=[11 + i, 12, 13, im_end], text="", truncated=False)
            s.advantage, s.times_drawn = (float("nan") if nan and i == 0 else (1.0 if i % 2 else -1.0)), 1
            out.append(s)
        return out

    policy = P.Policy(m)
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    cfg = G.GRPOConfig(mini_batch=4, micro_batch=2, entropy_warmup=0, max_bad_steps=2)
    context = (recs, encoded, p, D.REASONING_PROMPT, "system")

    def run(samples, bad):
        gen = torch.Generator().manual_seed(0)
        return G.update(policy, None, samples, *context, cfg, Dist(), 0.0, gen, params, opt, bad)

    bad = {"streak": 0, "total": 0}
    stats = run(batch(False), bad)  # a first real step, so AdamW has moments to protect
    assert stats["updates"] == 1 and stats["skipped_updates"] == 0
    weights = [q.detach().clone() for q in params]
    moments = {k: v.clone() for k, v in opt.state[params[0]].items()}
    stats = run(batch(True), bad)
    assert stats["updates"] == 0 and stats["skipped_updates"] == 1 and bad == {"streak": 1, "total": 1}
    assert all(torch.equal(a, b) for a, b in zip(weights, params)), "a NaN update reached the weights"
    assert all(torch.equal(moments[k], v) for k, v in opt.state[params[0]].items())
    assert all(q.grad is None for q in params)  # freed after the step, skipped or not
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    stats = run(batch(False), bad)  # the run goes on
    assert stats["updates"] == 1 and bad == {"streak": 0, "total": 1}
    assert any(not torch.equal(a, b) for a, b in zip(weights, params))
    run(batch(True), bad)
    with pytest.raises(NonFiniteError, match="2 non-finite optimizer steps in a row"):
        run(batch(True), bad)


def test_fitting_prompts_drops_overlong_counts_and_decodes_no_pixels(tiny, tmp_path, monkeypatch, capsys):
    """The start-up prompt filter: over-long prompts dropped and counted, image headers read but no pixel
    decoded (the rank that uses an image decodes it), a missing image named once for every rank."""
    from common import Dist

    _, p = tiny
    recs = _records(tmp_path) + [D.Record(id="long", problem="seven " * 400, answer="1", source="t:3")]
    decoded = []
    monkeypatch.setattr(D, "open_image", lambda *a: decoded.append(a))
    kept = G.fitting_prompts(recs, p, D.REASONING_PROMPT, "system", 300, Dist())
    assert [r.id for r in kept] == ["m", "t"] and decoded == []
    assert "dropped 1 of 3 prompts over max_prompt_len 300" in capsys.readouterr().out
    missing = [D.Record(id="x", problem="p", answer="1", images=[str(tmp_path / "none.png")], source="t:7")]
    with pytest.raises(D.DataError, match="t:7: field 'images': image file not found"):
        G.fitting_prompts(missing, p, D.REASONING_PROMPT, "system", 300, Dist())


def test_collective_timeout_is_the_configured_one(monkeypatch):
    """dist_timeout_min reaches init_process_group (torch's 10-minute NCCL default is shorter than a long
    rollout step's skew between ranks)."""
    import datetime

    import torch.distributed as dist

    import common as C

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, timeout: seen.update(backend=backend, t=timeout)
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    d = C.init_distributed(device="cpu", timeout_min=G.GRPOConfig().dist_timeout_min)
    assert seen == {"backend": "gloo", "t": datetime.timedelta(minutes=180)} and d.rank == 1 and d.world == 2
