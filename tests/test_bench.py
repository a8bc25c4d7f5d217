"""The benchmarks' own checks: our sampler and decode loop against HF `generate`, the shared-prompt training
forward against the plain one, and the GPU benchmark's CPU dry run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

import data as D
import model as M
import policy as P
import sampling as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What HF `generate` samples from: temperature, then top-p, then softmax."""
    scores = logits[None].clone()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0]


@pytest.mark.parametrize(
    "vocab,temperature,top_p", [(20, 0.7, 0.8), (97, 1.3, 0.5), (64, 1.0, 1.0), (130, 1.0, 0.95)]
)
def test_sampler_matches_hf_distribution(vocab, temperature, top_p):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(vocab, generator=g) * 2
    logits[3] = -float("inf")  # a suppressed token
    ref = hf_distribution(logits, temperature, top_p)
    n = 200_000
    torch.manual_seed(0)
    draws = S.sample_tokens(logits[None].expand(n, vocab).contiguous(), temperature, top_p)
    freq = torch.bincount(draws, minlength=vocab).double() / n
    assert freq[ref == 0].sum() == 0, "drew a token outside HF's nucleus (or a -inf one)"
    sigma = (ref.double() * (1 - ref.double()) / n).sqrt()
    assert ((freq - ref.double()).abs() <= 5 * sigma + 1e-9).all(), (freq, ref)


def test_sampler_full_vocabulary_nucleus():
    """At Qwen's 151,936 ids: every draw lies in HF's nucleus, and the head of the distribution has HF's mass."""
    v = 151_936
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(v, generator=g) * 4
    ref = hf_distribution(logits, 0.8, 0.9)
    torch.manual_seed(1)
    n = 4000
    draws = torch.cat(
        [S.sample_tokens(logits[None].expand(500, v).contiguous(), 0.8, 0.9) for _ in range(n // 500)]
    )
    assert bool((ref[draws] > 0).all())
    top = ref.topk(20).indices
    p_top = float(ref[top].sum())
    freq_top = float(torch.isin(draws, top).double().mean())
    assert abs(freq_top - p_top) < 5 * (p_top * (1 - p_top) / n) ** 0.5 + 1e-6


def _prompts(synth_dir, processor, k=3):
    recs = D.load_records(os.path.join(synth_dir, "mm_train.jsonl"))[:k]
    enc = [D.encode_prompt(r, processor) for r in recs]
    text = D.Record(id="t", problem="What is 2 + 3?", answer="5")
    return enc + [D.encode_prompt(text, processor)]  # different lengths: left padding; one without an image


def test_generate_greedy_matches_hf(tiny, synth_dir):
    model, processor = tiny
    tok = processor.tokenizer
    enc = _prompts(synth_dir, processor)
    gc = S.generation_config(tok, 0.0, 1.0, 12)
    for n in (1, 3):
        repeated = D.collate_prompts(
            [e for e in enc for _ in range(n)], tok.pad_token_id, model.config.image_token_id
        )
        once = D.collate_prompts(enc, tok.pad_token_id, model.config.image_token_id)
        ref = model.generate(**repeated, generation_config=gc, synced_gpus=False)
        assert torch.equal(S.generate(model, **repeated, generation_config=gc), ref)
        assert torch.equal(S.generate(model, **once, generation_config=gc, num_return_sequences=n), ref)
    text_only = D.collate_prompts([enc[-1], enc[-1]], tok.pad_token_id, model.config.image_token_id)
    assert torch.equal(
        S.generate(model, **text_only, generation_config=gc),
        model.generate(**text_only, generation_config=gc),
    )


def test_generate_sampling_lengths_and_fallback(tiny, synth_dir):
    model, processor = tiny
    tok = processor.tokenizer
    batch = D.collate_prompts(_prompts(synth_dir, processor), tok.pad_token_id, model.config.image_token_id)
    gc = S.generation_config(tok, 1.0, 0.95, 10)
    gc.min_new_tokens = 10
    torch.manual_seed(0)
    out = S.generate(model, **batch, generation_config=gc, num_return_sequences=4)
    new = out[:, batch["input_ids"].shape[1] :]
    assert new.shape == (16, 10)
    eos = set(gc.eos_token_id)
    assert not any(t in eos for t in new.flatten().tolist()), "min_new_tokens must hold off the end of turn"
    assert not bool(torch.isin(new, torch.tensor(S.vision_special_ids(tok))).any())
    assert len({tuple(r) for r in new[:4].tolist()}) > 1, "a group's samples must differ"
    top_k = S.generation_config(tok, 1.0, 1.0, 5)
    top_k.top_k = 5
    assert not S.fast_generate_supported(top_k)
    torch.manual_seed(0)
    assert S.generate(model, **batch, generation_config=top_k).shape[0] == 4  # handed to HF generate


def _grads(policy, batch):
    policy.model.zero_grad()
    inputs = "input_ids attention_mask target_mask pixel_values image_grid_thw mm_token_type_ids".split()
    logp, ent = policy(*(batch[k] for k in inputs), with_entropy=True)
    (logp.sum() + 0.3 * ent.sum()).backward()
    return (
        logp.detach(),
        ent.detach(),
        {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None},
    )


@pytest.mark.parametrize("switch", ["dedupe_images", "share_prefix"])
def test_shared_images_and_prompts_match_plain_forward(synth_dir, switch):
    model, processor = M.load_model("tiny", seed=0)
    policy = P.Policy(model)
    enc = _prompts(synth_dir, processor)
    order = [0, 1, 0, 3, 2, 1, 0, 3]  # groups with repeated prompts and images, one text-only prompt
    batch = D.collate_sequences(
        [enc[i] for i in order],
        [[5, 6, 7, 8, 9][: 2 + i % 4] for i in range(len(order))],
        processor.tokenizer.pad_token_id,
        model.config.image_token_id,
    )
    policy.dedupe_images, policy.share_prefix = False, False
    plain = _grads(policy, batch)
    setattr(policy, switch, True)
    fast = _grads(policy, batch)
    assert torch.allclose(fast[0], plain[0], atol=1e-5) and torch.allclose(fast[1], plain[1], atol=1e-4)
    assert fast[2].keys() == plain[2].keys()
    for k in plain[2]:
        assert torch.allclose(fast[2][k], plain[2][k], rtol=1e-4, atol=1e-6), k


def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = ["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--dry-run", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    names = {(row["measurement"], row.get("path")) for row in rows}
    assert {
        ("env", None),
        ("bw", None),
        ("train", None),
        ("engine", None),
        ("decode", "hf_generate"),
        ("decode", "ours_generate"),
        ("decode", "hf_static_compiled"),
        ("rollout", None),
        ("update", None),
        ("load", None),
    } <= names, names
    for row in rows:
        if row["measurement"] == "decode":
            assert row["decode_tokens_per_s"] > 0 and row["roofline_step_s"] > 0
        if row["measurement"] == "engine":
            assert row["useful_tokens_per_s"] > 0 and row["roofline_step_s"] > 0 and row["kv_cache_bytes"] > 0
        if row["measurement"] == "train":
            assert row["step_s"] > 0 and 0 < row["mfu"] < 1
        if row["measurement"] == "rollout":  # every row ran its forced 16 new tokens
            assert row["generated_tokens"] == row["prompts"] * row["new_tokens"] and row["kv_cache_bytes"] > 0
        # on CPU no peak is measured; the prediction exceeds the step's state
        if row["measurement"] == "update":
            assert row["predicted_forward_backward_bytes"] > row["predicted_step_bytes"] > 0
        if row["measurement"] == "load":  # the host held about one fp32 copy of the checkpoint's weights
            assert row["read_s"] > 0 and 0.25 < row["host_predicted_over_measured"] < 4
    summary = (out / "summary.txt").read_text()
    # every measurement within the budget
    assert "stopped" not in summary and "skipped" not in summary, summary
