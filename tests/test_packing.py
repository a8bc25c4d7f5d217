"""Padding-free micro-batches (issue 17): the packed forward against the padded one, the packed position ids
against each sequence computed alone, and the token-budget packer's invariants."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

import common as C
import data as D
import grpo_mm as G
import model as M
import policy as P
import sft
from conftest import ROOT

# The packed and padded forwards run the same sums in a different order ((2, 625) rows against (6, 509)):
# per-token log-probs agree to 1.5e-7 relative and every parameter's gradient to 6.2e-7 in norm (measured on
# the batch below, fp32); the bounds are the 1e-5.
RTOL_LOGP, RTOL_GRAD = 1e-5, 1e-5


def _prompts(synth_dir, processor):
    """Three prompts with an image (different sizes of text) and one text-only prompt."""
    recs = D.load_records(os.path.join(synth_dir, "mm_train.jsonl"))[:3]
    text = D.Record(id="t", problem="What is 2 + 3?", answer="5")
    return [D.encode_prompt(r, processor) for r in recs] + [D.encode_prompt(text, processor)]


def _batch(synth_dir, processor, image_token_id, order=(0, 3, 1, 2, 3, 0), lengths=(3, 400, 1, 40, 7, 12)):
    """Sequences of very different lengths (1 to 400 completion tokens), images on some, a repeated image."""
    enc = _prompts(synth_dir, processor)
    g = torch.Generator().manual_seed(0)
    comps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]  # plain BPE ids of `tiny`
    pad_id = processor.tokenizer.pad_token_id
    return D.collate_sequences([enc[i] for i in order], comps, pad_id, image_token_id)


# Policy's positional inputs, in its order.
POLICY_INPUTS = "input_ids attention_mask target_mask pixel_values image_grid_thw mm_token_type_ids".split()


def _positions(model, batch):
    """The padded batch's position ids, each row computed on its own."""
    keys = ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")
    return P.position_ids_for(model, *(batch[k] for k in keys))


def _logp_and_grads(policy, batch):
    policy.model.zero_grad()
    logp, ent = policy(*(batch[k] for k in POLICY_INPUTS), with_entropy=True)
    (logp.sum() + 0.3 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


ROWS = [[1, 4, 0], [3], [5, 2]]  # a row of three sequences, one of one (no padding), one ending in padding


def test_packed_positions_are_each_sequence_alone(tiny, synth_dir):
    """Row 0 restarts at 0 per sequence; rows 1-3 are the M-RoPE positions of the sequence run on its own
    (no padding, batch of one); `where` points at each token; transformers reads one packed sequence per input
    sequence from row 0 (and the trailing padding as a block of its own)."""
    model, processor = tiny
    batch = _batch(synth_dir, processor, model.config.image_token_id)
    pos = _positions(model, batch)
    ids, packed, where = P.pack_sequences(batch["input_ids"], batch["attention_mask"], pos, ROWS, pad_id=-7)
    lengths = batch["attention_mask"].sum(-1).tolist()
    width = max(sum(lengths[b] for b in row) for row in ROWS)
    assert ids.shape == (3, width) and packed.shape == (4, 3, width)
    assert int((where >= 0).sum()) == sum(lengths) and int((ids == -7).sum()) == 3 * width - sum(lengths)
    images_per_seq = (batch["input_ids"] == model.config.vision_start_token_id).sum(-1).tolist()
    grids = batch["image_grid_thw"].split(images_per_seq)
    for r, row in enumerate(ROWS):
        start = 0
        for b in row:
            n = lengths[b]
            alone = batch["input_ids"][b, :n][None]
            grid = grids[b] if len(grids[b]) else None
            mm = (alone == model.config.image_token_id).int()
            ref = P.position_ids_for(model, alone, torch.ones_like(alone), grid, mm)
            assert torch.equal(ids[r, start : start + n], alone[0])
            assert torch.equal(packed[0, r, start : start + n], torch.arange(n))
            assert torch.equal(packed[1:, r, start : start + n], ref[:, 0])
            assert torch.equal(where[b, :n], r * width + start + torch.arange(n))
            assert (where[b, n:] == -1).all()
            start += n
        seq_of = find_packed_sequence_indices(packed[0, r][None])[0]  # what transformers builds the mask from
        want = torch.repeat_interleave(torch.arange(len(row)), torch.tensor([lengths[b] for b in row]))
        tail = torch.full((width - start,), len(row), dtype=torch.long)  # the padding: one more block
        assert torch.equal(seq_of, torch.cat([want, tail])), (r, seq_of)


@pytest.mark.parametrize("dedupe,attention", [(False, "sdpa"), (True, "sdpa"), (False, "eager")])
def test_packed_forward_matches_padded(synth_dir, dedupe, attention):
    """Per-token log-probs, entropies and every gradient of the packed forward equal the padded forward's
    (images, up to six sequences in a row, 1 to 400 completion tokens). sdpa: the packed forward switches the
    decoder to policy.varlen_sdpa_attention and runs one row of all six sequences; eager (no varlen attention):
    rows about as wide as the longest sequence with a block-diagonal mask."""
    model, processor = M.load_model("tiny", seed=0)
    model.set_attn_implementation(attention)
    policy = P.Policy(model)
    policy.dedupe_images = dedupe
    batch = _batch(synth_dir, processor, model.config.image_token_id)
    # the premise: without varlen attention the Policy packs the six sequences into two rows (of 625 and 581
    # tokens), and the images (of sequences 0, 2, 3, 5) come out in another order (3, 5, 0, 2), so they must
    # move with their sequences
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert D.pack_rows(lengths, D.MAX_WIDEN) == [[1, 4], [3, 5, 0, 2]]
    assert D.pack_rows(lengths) == [list(range(6))]
    padded = _logp_and_grads(policy, batch)
    policy.pack = True
    packed = _logp_and_grads(policy, batch)
    sel = batch["target_mask"].clone()
    sel[:, 0] = False
    assert torch.equal(packed[0] != 0, sel) and torch.equal(padded[0] != 0, sel)
    assert torch.allclose(packed[0], padded[0], rtol=RTOL_LOGP, atol=0)
    assert torch.allclose(packed[1], padded[1], rtol=RTOL_LOGP, atol=1e-6)
    assert packed[2].keys() == padded[2].keys() and len(padded[2]) == len(list(model.parameters()))
    for k, g in padded[2].items():
        assert (packed[2][k] - g).norm() <= RTOL_GRAD * g.norm(), k
    want_attention = P.VARLEN_ATTENTION if attention == "sdpa" else "eager"
    assert model.config.text_config._attn_implementation == want_attention


def test_varlen_attention_on_several_rows_matches_the_block_mask(synth_dir):
    """policy.varlen_sdpa_attention on rows of several sequences (one row ending in padding, no mask built) gives
    the hidden states of transformers' sdpa with the block-diagonal mask it builds from the same positions."""
    model, processor = M.load_model("tiny", seed=0)
    batch = _batch(synth_dir, processor, model.config.image_token_id)
    pos = _positions(model, batch)
    ids, packed, where = P.pack_sequences(batch["input_ids"], batch["attention_mask"], pos, ROWS)
    lengths = batch["attention_mask"].sum(-1).tolist()
    bounds = P.segment_bounds(packed[0])
    want = [[lengths[b] for b in row] for row in ROWS]
    width = ids.shape[1]
    want = [w + ([width - sum(w)] if sum(w) < width else []) for w in want]  # padding: a segment
    assert [[e - s for s, e in row] for row in bounds] == want
    run = dict(
        input_ids=ids,
        position_ids=packed,
        mm_token_type_ids=(ids == model.config.image_token_id).int(),
        pixel_values=batch["pixel_values"],
        use_cache=False,
    )
    order = [b for row in ROWS for b in row]  # images in the packed order of their sequences
    per_seq = (batch["input_ids"] == model.config.vision_start_token_id).sum(-1).tolist()
    blocks = D.slice_pixel_values(batch["pixel_values"], batch["image_grid_thw"], per_seq)
    first = [sum(per_seq[:b]) for b in range(len(per_seq))]
    run["pixel_values"] = torch.cat([blocks[b] for b in order])
    image_rows = [i for b in order for i in range(first[b], first[b] + per_seq[b])]
    run["image_grid_thw"] = batch["image_grid_thw"][image_rows]
    with torch.no_grad():
        masked = model.model(attention_mask=None, **run).last_hidden_state.flatten(0, 1)
        assert P.use_varlen_attention(model)
        varlen = model.model(attention_mask=P.NO_MASK, **run).last_hidden_state.flatten(0, 1)
    real = where[where >= 0]
    assert torch.allclose(varlen[real], masked[real], atol=1e-5, rtol=1e-5)


def test_packed_gradient_checkpointing_and_bf16(synth_dir):
    """The packed forward under gradient checkpointing gives the gradients it gives without (the recomputation
    runs the same varlen attention), and under bf16 autocast it runs with finite log-probs and gradients close
    to fp32's (the logits stay fp32; bf16 rounding in the decoder only)."""
    model, processor = M.load_model("tiny", seed=0)
    policy = P.Policy(model)
    policy.pack = True
    batch = _batch(synth_dir, processor, model.config.image_token_id)
    plain = _logp_and_grads(policy, batch)
    M.set_gradient_checkpointing(model, True)
    assert M.is_gradient_checkpointing(model)
    ckpt = _logp_and_grads(policy, batch)
    M.set_gradient_checkpointing(model, False)
    assert torch.allclose(ckpt[0], plain[0], rtol=1e-6, atol=0)
    for k, g in plain[2].items():
        assert (ckpt[2][k] - g).norm() <= 1e-6 * g.norm(), k
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _logp_and_grads(policy, batch)
    sel = plain[0] != 0
    assert torch.isfinite(bf16[0]).all() and torch.equal(bf16[0] != 0, sel)
    assert (bf16[0][sel] - plain[0][sel]).abs().max() < 0.05  # log-probs near -6.6 (tiny's 768 tokens)
    for k, g in plain[2].items():
        assert torch.isfinite(bf16[2][k]).all() and (bf16[2][k] - g).norm() <= 0.1 * g.norm(), k


def test_packing_without_restarting_positions_leaks_across_sequences(tiny, synth_dir):
    """The control: the same packed rows with positions that do NOT restart (one long sequence per row to
    transformers) let later sequences attend to earlier ones, and their hidden states change. The exactness
    above is the mask's doing, not an accident of the data."""
    model, processor = tiny
    # text only
    batch = _batch(synth_dir, processor, model.config.image_token_id, order=(3, 3), lengths=(5, 9))
    pos = P.position_ids_for(
        model, batch["input_ids"], batch["attention_mask"], None, batch["mm_token_type_ids"]
    )
    ids, packed, where = P.pack_sequences(batch["input_ids"], batch["attention_mask"], pos, [[0, 1]])
    run = dict(input_ids=ids, attention_mask=None, mm_token_type_ids=torch.zeros_like(ids), use_cache=False)
    with torch.no_grad():
        good = model.model(position_ids=packed, **run).last_hidden_state[0]
        leaky = packed.clone()
        leaky[0] = torch.arange(ids.shape[1])
        bad = model.model(position_ids=leaky, **run).last_hidden_state[0]
        alone = model.model(
            input_ids=batch["input_ids"][1:],
            attention_mask=batch["attention_mask"][1:],
            position_ids=pos[:, 1:],
            mm_token_type_ids=torch.zeros_like(batch["input_ids"][1:]),
            use_cache=False,
        ).last_hidden_state[0]
    first, second = where[0][where[0] >= 0], where[1][where[1] >= 0]
    assert torch.equal(good[first], bad[first])  # the first sequence sees nothing else either way
    assert torch.allclose(good[second], alone[: len(second)], atol=1e-5)  # the second as if alone
    assert (good[second] - bad[second]).abs().max() > 1e-3  # and not when the mask lets it see the first


# ----------------------------------------------------------------------------------------------------------
# The token-budget packer


def _check_bins(bins, lengths, budget):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every sequence exactly once"
    for b in bins:
        assert sum(lengths[i] for i in b) <= budget or len(b) == 1, (b, [lengths[i] for i in b])


def test_pack_by_tokens_by_hand():
    # FFD: 7 -> bin A (3 left); 5 -> bin B (5 left); 4 -> B (1 left); 3 -> A (0 left); 2 -> C; 1 -> B (0 left)
    assert D.pack_by_tokens([3, 7, 1, 5, 2, 4], 10) == [[1, 0], [3, 5, 2], [4]]
    # a sequence over the budget gets a bin of its own; equal lengths keep index order
    assert D.pack_by_tokens([12, 4, 4, 4], 10) == [[0], [1, 2], [3]]
    assert D.pack_by_tokens([], 10) == []


@pytest.mark.parametrize("seed", range(5))
def test_pack_by_tokens_long_tailed_random(seed):
    g = torch.Generator().manual_seed(seed)
    # log-normal, long tail
    lengths = torch.randn(200, generator=g).add(5.0).exp().clamp(8, 3000).long().tolist()
    budget = 4096
    bins = D.pack_by_tokens(lengths, budget)
    _check_bins(bins, lengths, budget)
    # FFD uses at most 11/9 OPT + 6/9 bins (Johnson's bound; Dosa 2007), and OPT >= total / budget
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // budget) + 6 / 9 + 1e-9


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_micro_batches_same_count_per_rank_balanced(world):
    lengths = [900, 30, 500, 480, 20, 10, 700, 60, 300, 250, 5]
    # a step's items in the epoch's order (a permutation of a subset)
    items = [10, 3, 7, 0, 9, 1, 2, 8, 4, 6, 5]
    per_rank = D.packed_micro_batches(items, lengths, 1000, world)
    assert len(per_rank) == world
    flat = sorted(i for p in per_rank for mb in p for i in mb)
    assert flat == sorted(items)
    assert all(sum(lengths[i] for i in mb) <= 1000 for p in per_rank for mb in p)
    counts = [len(p) for p in per_rank]
    assert max(counts) - min(counts) <= 1
    # sft.rank_micro_batches pads the short ranks with zero-weight fillers (None): the same count everywhere
    mine = [sft.rank_micro_batches(items, 4, world, r, lengths, 1000) for r in range(world)]
    assert len({len(m) for m in mine}) == 1
    assert [[mb for mb in m if mb is not None] for m in mine] == per_rank
    loads = [sum(lengths[i] for mb in p for i in mb) for p in per_rank]
    if world == 2:  # 3245 tokens: the heaviest bins alternate, the loads differ by less than one bin
        assert abs(loads[0] - loads[1]) <= max(sum(lengths[i] for i in mb) for p in per_rank for mb in p)


def test_grpo_plan_packs_by_prompt_plus_completion():
    comp = [40, 6, 7, 8, 9, 100, 3]
    samples = [
        G.Sample(rec=i, completion=[1] * n, text="", truncated=False, times_drawn=1 + (i == 2), prompt_len=50)
        for i, n in enumerate(comp)
    ]
    cfg = G.GRPOConfig(mini_batch=5, micro_batch_tokens=128)
    plans = G.plan_updates(samples, cfg, 2, torch.Generator().manual_seed(0))
    drawn = sorted(i for i, s in enumerate(samples) for _ in range(s.times_drawn))
    assert sorted(i for micro, _ in plans for rank in micro for mb in rank for i in mb) == drawn
    for micro, tokens in plans:
        assert len(micro[0]) == len(micro[1])  # the same number of micro-batches on both ranks
        assert tokens == sum(len(samples[i].completion) for rank in micro for mb in rank for i in mb)
        for rank in micro:
            for mb in rank:
                assert len(mb) <= 1 or sum(50 + comp[i] for i in mb) <= 128, mb
    # the mini-batches themselves (and so the loss) are those of the padded plan: only the grouping differs
    padded_cfg = G.GRPOConfig(mini_batch=5, micro_batch=2)
    padded = G.plan_updates(samples, padded_cfg, 2, torch.Generator().manual_seed(0))

    def mini_batches(plans):
        return [sorted(i for rank in m for mb in rank for i in mb) for m, _ in plans]

    assert mini_batches(plans) == mini_batches(padded)
    assert [t for _, t in plans] == [t for _, t in padded]


# ----------------------------------------------------------------------------------------------------------
# SFT: the packed run against the padded one


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """48 SFT records, half with an image, and 16 held out (as tests/test_sft.py's small_data), with a long tail:
    every sixth training solution written out eight times (about 400 tokens against 125-170), so a packed row
    (as wide as the micro-batch's longest sequence) holds two or three of the others."""
    import synth

    out = str(tmp_path_factory.mktemp("pack_sft"))
    sizes = dict(n_sft=48, n_sft_test=16, n_mm_train=0, n_text_train=0, n_mm_test=0, n_text_test=0)
    synth.write_synth(out, synth.SynthConfig(seed=1, mm_share=0.5, **sizes))
    path = os.path.join(out, "sft.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    for row in rows[::6]:
        row["solution"] = " ".join([row["solution"]] * 8)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return out


# tokens per packed micro-batch: 3-5 records; with 2 ranks some steps need a zero-weight filler
SFT_BUDGET = 768


def _sft_args(data_dir: str, out_dir: str, budget: int) -> list[str]:
    # no length grouping: the padded micro-batches mix lengths (padding), the packed ones hold several sequences
    data, eval_data = os.path.join(data_dir, "sft.jsonl"), os.path.join(data_dir, "sft_test.jsonl")
    steps = "--max_steps 4 --global_batch 8 --micro_batch 2".split() + ["--micro_batch_tokens", str(budget)]
    rest = "--group_by_length false --lr 3e-3 --save_every 0 --eval_every 2 --log_every 0".split()
    return ["--data", data, "--eval_data", eval_data, "--out_dir", out_dir, *steps, *rest]


def _sft_run(data_dir: str, out_dir: str, budget: int) -> tuple[list[dict], dict]:
    sft.train(C.parse_config(sft.SFTConfig, _sft_args(data_dir, out_dir, budget)))
    return _metrics(out_dir), M.load_model(os.path.join(out_dir, "final"))[0].state_dict()


def _metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def sft_padded(sft_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft_padded"))
    return _sft_run(sft_data, out, 0)


def _assert_same_sft(rows, ref, rel):
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for a, b in zip(rows, ref):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=rel), (a, b)
        assert ("eval_loss" in a) == ("eval_loss" in b)
        if "eval_loss" in b:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=rel)


@pytest.mark.slow
def test_sft_packed_matches_padded(sft_data, sft_padded, tmp_path):
    """Four SFT steps (images in half the records, lengths mixed) packed into 512-token rows give the padded
    run's losses, eval losses and final weights (measured: losses within 3e-8 relative, weights within 1e-5)."""
    ref, ref_sd = sft_padded
    rows, sd = _sft_run(sft_data, str(tmp_path / "packed"), SFT_BUDGET)
    _assert_same_sft(rows, ref, rel=1e-6)
    assert max(float((sd[k] - ref_sd[k]).abs().max()) for k in sd) < 1e-4
    assert all(a["pad_frac"] <= b["pad_frac"] for a, b in zip(rows, ref))
    assert max(r["pad_frac"] for r in ref) > 0.1
    # the premise: packed micro-batches hold several sequences (the first step's plan)
    records = D.load_records(os.path.join(sft_data, "sft.jsonl"), require_solution=True)
    examples = sft.build_examples(records, M.load_model("tiny")[1], sft.SFTConfig(data="x"))
    lengths = [e.length for e in examples]
    order = sft.epoch_order(lengths, 0, 0, 2, False)
    plans = [sft.rank_micro_batches(order[s : s + 8], 2, 1, 0, lengths, SFT_BUDGET) for s in range(0, 32, 8)]
    assert all(len(plan) < 4 for plan in plans)  # fewer micro-batches than the padded path's four
    rows = [D.pack_rows([lengths[i] for i in mb]) for plan in plans for mb in plan]
    assert max(len(row) for r in rows for row in r) >= 2  # a packed row holds several sequences


@pytest.mark.slow
def test_sft_packed_two_processes_fsdp_matches_padded_one(sft_data, sft_padded, tmp_path):
    """torchrun x2 (FSDP2, packed, the micro-batches dealt by tokens, zero-weight fillers where a rank is short)
    logs the single padded process's losses."""
    ref, ref_sd = sft_padded
    out = str(tmp_path / "fsdp_packed")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    sft_args = _sft_args(sft_data, out, SFT_BUDGET)
    cmd = [*launch, os.path.join(ROOT, "sft.py"), *sft_args, "--distributed", "fsdp"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    _assert_same_sft(_metrics(out), ref, rel=1e-5)
    sd = M.load_model(os.path.join(out, "final"))[0].state_dict()
    assert max(float((sd[k] - ref_sd[k]).abs().max()) for k in sd) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# GRPO: the packed update on 2 processes against the padded one on 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_grpo_packed_two_processes_matches_padded_one(synth_dir, tmp_path, backend):
    """tests/grpo_worker.py's fixed rollouts (PAD on: 5 of 12 kept), 2 updates x 2 ppo epochs with a k3 KL to a
    reference model: torchrun x2 with 300-token packed micro-batches (rank 0 packs the multimodal sequence with a
    text one, then two text ones while rank 1 runs a zero-weight filler) gives the weights and the logged
    statistics of one process with padded micro-batches of one sequence (share_prefix on, as grpo_mm.py runs)."""
    from test_grpo_dist import W, _compare_states, _compare_stats, run_worker

    case = {"mini_batch": 3, "micro_batch": 1, "ppo_epochs": 2, "kl_coef": 0.05}
    runs = {"single": (0, case), "packed": (2, dict(case, micro_batch_tokens=300))}
    for name, (nproc, overrides) in runs.items():
        cases = json.dumps({"pk": [overrides, 0.01]})
        args = ["--synth", synth_dir, "--out", str(tmp_path / name), "--distributed", backend]
        run_worker(nproc, "update", *args, "--cases", cases)
    want = json.load(open(tmp_path / "single" / "pk.json"))
    got = json.load(open(tmp_path / "packed" / "pk.json"))
    assert want["world"] == 1 and got["world"] == 2 and got["picks"] == want["picks"]
    # the premise: several sequences in one packed row, the image sample (0) on rank 0 only, a filler on rank 1
    shapes = [[[len(mb) for mb in rank] for rank in micro] for micro, _ in got["plan"]]
    assert shapes == [[[2], [1]], [[2], [0]]]
    assert 0 in got["plan"][0][0][0][0] and [t for _, t in got["plan"]] == [t for _, t in want["plan"]]
    initial = torch.load(tmp_path / "single" / "initial.pt")
    label = f"packed {backend} x2 vs padded x1"
    packed, single = torch.load(tmp_path / "packed" / "pk.pt"), torch.load(tmp_path / "single" / "pk.pt")
    _compare_states(packed, single, initial, label)
    _compare_stats(got["stats"], want["stats"], label)
    assert got["stats"]["updates"] == 4 and G.GRPOConfig().micro_batch_tokens == 0 and W.N == 4


@pytest.mark.slow
def test_grpo_update_packed_matches_padded_one_process(synth_dir):
    """grpo_mm.update on one process, PAD on (one sequence drawn twice), 2 updates x 2 ppo epochs: 900-token
    micro-batches packed into rows of several sequences (a 300-token completion sets the row width) give the
    padded update's statistics and weights (padded: one sequence per micro-batch, share_prefix and
    dedupe_images on, as grpo_mm.setup_policy sets them)."""
    mm = D.load_records(os.path.join(synth_dir, "mm_train.jsonl"), limit=2)
    records = mm + D.load_records(os.path.join(synth_dir, "text_train.jsonl"), limit=1)
    _, processor = M.load_model("tiny", seed=0)
    encoded = {i: D.encode_prompt(r, processor) for i, r in enumerate(records)}
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    g = torch.Generator().manual_seed(3)
    samples = []
    for rec, n, adv, drawn in [
        (0, 300, 1.2, 1),
        (0, 5, -0.4, 1),
        (1, 12, 0.8, 2),
        (1, 30, -1.1, 1),
        (2, 8, 0.5, 1),
        (2, 20, -0.9, 0),
        (2, 3, 0.3, 1),
    ]:
        comp = torch.randint(0, 300, (n - 1,), generator=g).tolist() + [im_end]
        prompt_len = len(encoded[rec].input_ids)
        kw = dict(text="", truncated=False, advantage=adv, times_drawn=drawn, prompt_len=prompt_len)
        samples.append(G.Sample(rec=rec, completion=comp, **kw))
    results = {}
    for name, budget in (("padded", 0), ("packed", 900)):
        cfg = G.GRPOConfig(
            mini_batch=4, micro_batch=1, micro_batch_tokens=budget, ppo_epochs=2, entropy_warmup=0
        )
        policy = P.Policy(M.build_tiny("tiny", seed=0)[0])
        policy.dedupe_images = policy.share_prefix = True
        policy.pack = budget > 0
        params = list(policy.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr)  # grpo_mm's default 5e-5, as tests/grpo_worker.py
        plans = G.plan_updates(samples, cfg, 1, torch.Generator().manual_seed(0))
        context = (records, dict(encoded), processor, D.REASONING_PROMPT, "system")
        gen = torch.Generator().manual_seed(0)
        stats = G.update(policy, None, samples, *context, cfg, C.Dist(), 0.02, gen, params, opt)
        results[name] = (stats, {k: v.detach().clone() for k, v in policy.state_dict().items()}, plans)
    (want, w_sd, w_plans), (got, g_sd, g_plans) = results["padded"], results["packed"]
    # the premise: the packed plan has fewer micro-batches, and some packed row holds several sequences
    assert sum(len(m[0]) for m, _ in g_plans) < sum(len(m[0]) for m, _ in w_plans)
    lengths = {i: s.prompt_len + len(s.completion) for i, s in enumerate(samples)}
    rows = [row for m, _ in g_plans for mb in m[0] for row in D.pack_rows([lengths[i] for i in mb])]
    assert any(len(row) > 1 for row in rows)
    assert got["updates"] == want["updates"] == 4
    for key in ("loss", "entropy", "clip_frac", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    from test_grpo_dist import _compare_states  # moved by more than 2e-5, equal within atol 1e-5, rtol 1e-4

    _compare_states(g_sd, w_sd, P.Policy(M.build_tiny("tiny", seed=0)[0]).state_dict(), "packed vs padded")


def test_sft_start_up_log_counts_packed_micro_batches():
    """sft's start-up log states the micro-batches per rank per step; with packing, their range over the first
    epoch (here the steps hold 290, 1650 and 900 tokens: 1, 2 and 1 micro-batches of at most 1000 tokens)."""
    import dataclasses

    lengths = [100, 900, 50, 60, 400, 30, 20, 700, 500, 80]
    cfg = sft.SFTConfig(global_batch=4, micro_batch=2)
    assert [sum(lengths[i] for i in s) for s in sft.epoch_steps(lengths, cfg, 0)] == [290, 1650, 900]
    assert sft.accumulation(cfg, lengths, 1) == "1-2"  # the last step holds 2 sequences
    packed = dataclasses.replace(cfg, micro_batch_tokens=1000)
    assert sft.accumulation(packed, lengths, 1) == "1-2" and sft.accumulation(packed, lengths, 2) == "1"
