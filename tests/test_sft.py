"""sft.py: the schedule and the loss normalisation by hand, config parsing, the 7B config's shapes (fast);
learning the synthetic task's format, 1 vs 2 processes (DDP and FSDP2), kill -9 and resume (slow)."""

import json
import math
import os
import re
import sys

import pytest
import torch

import common as C
import data as D
import model as M
import sft
from conftest import ROOT, run_command

CONFIGS = os.path.join(ROOT, "configs")


def _env(**extra) -> dict:
    paths = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(paths))
    env.update(extra)
    return env


def run_sft(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 300):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    launcher = [sys.executable] if nproc == 1 else torchrun
    cmd = launcher + [os.path.join(ROOT, "sft.py")] + args
    return run_command(cmd, timeout, cwd=ROOT, env=env or _env())


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Fast tier


def test_cosine_warmup_schedule_by_hand():
    # total 10, ratio 0.2 -> 2 warm-up steps: (t+1)/3 for t = 0, 1; then 0.5 (1 + cos(pi (t-2)/8))
    expected = [
        1 / 3,
        2 / 3,
        1.0,
        0.9619397662556434,
        0.8535533905932737,
        0.6913417161825449,
        0.5,
        0.30865828381745514,
        0.14644660940672627,
        0.03806023374435663,
    ]
    got = [sft.lr_at(t, 10, 1.0, 0.2) for t in range(10)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert sft.warmup_steps(3675, 0.05) == 184
    assert sft.lr_at(0, 100, 2e-5, 0.0) == pytest.approx(2e-5)  # no warm-up: starts at the peak
    assert all(sft.lr_at(t, 50, 1.0, 0.05) > 0 for t in range(50))  # no step at lr 0


def test_micro_batches_dealt_to_ranks_with_zero_weight_fillers():
    items = list(range(10))
    one = sft.rank_micro_batches(items, 2, 1, 0)
    assert one == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    r0, r1 = (sft.rank_micro_batches(items, 2, 2, r) for r in (0, 1))
    assert r0 == [[0, 1], [4, 5], [8, 9]] and r1 == [[2, 3], [6, 7], None]  # same count, filler last
    r = [sft.rank_micro_batches(items[:3], 4, 3, k) for k in range(3)]
    assert r == [[[0, 1, 2]], [None], [None]]


def test_epoch_order_depends_only_on_seed_and_epoch():
    lengths = [5, 50, 7, 48, 6, 49, 8, 51] * 4
    a = sft.epoch_order(lengths, 3, 1, 4, True)
    assert a == sft.epoch_order(lengths, 3, 1, 4, True) and sorted(a) == list(range(32))
    assert a != sft.epoch_order(lengths, 3, 2, 4, True) and a != sft.epoch_order(lengths, 4, 1, 4, True)
    grouped = sum(D.padding_fraction([lengths[i] for i in a[s : s + 4]]) for s in range(0, 32, 4))
    plain = sft.epoch_order(lengths, 3, 1, 4, False)
    ungrouped = sum(D.padding_fraction([lengths[i] for i in plain[s : s + 4]]) for s in range(0, 32, 4))
    assert grouped < ungrouped


def test_loss_is_mean_over_global_tokens_whatever_the_split():
    """Two 'ranks' with unequal token counts and several micro-batches each, gradients averaged as DDP/FSDP do:
    the update equals the gradient of the token mean over the whole global batch."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 11, generator=g, requires_grad=True)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 11, (40,), generator=g)

    def nll(idx):
        return torch.nn.functional.cross_entropy(x[idx] @ w, y[idx], reduction="sum")

    full = torch.autograd.grad(nll(list(range(40))) / 40, w)[0]
    split = {0: [list(range(0, 3)), list(range(3, 25))], 1: [list(range(25, 26)), list(range(26, 40))]}
    world = len(split)
    grads = []
    for rank in split:
        loss = sft.token_mean_loss([nll(mb) for mb in split[rank]], 40, world)
        grads.append(torch.autograd.grad(loss, w)[0])
    assert torch.allclose(sum(grads) / world, full, atol=1e-6)
    # the naive per-micro-batch mean differs
    naive = sum(torch.autograd.grad(nll(mb) / len(mb), w)[0] for r in split for mb in split[r]) / 4
    assert not torch.allclose(naive, full, atol=1e-3)


def test_config_help_unknown_key_and_yaml(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_config(sft.SFTConfig, ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    fields = "lr warmup_ratio global_batch micro_batch max_len resume distributed bf16 gradient_checkpointing"
    fields += " freeze_vision max_bad_steps wandb_project placement"
    for f in fields.split():
        assert f"--{f} " in text
    with pytest.raises(C.ConfigError, match="bogus"):
        C.parse_config(sft.SFTConfig, ["--bogus=1"])
    yaml = os.path.join(CONFIGS, "sft_tiny.yaml")
    cfg = C.parse_config(sft.SFTConfig, ["--config", yaml, "--lr", "0.5", "--betas=0.9,0.95"])
    assert cfg.lr == 0.5 and cfg.betas == [0.9, 0.95] and cfg.model == "tiny"


def test_sft_7b_config_is_the_paper_and_builds_8b_on_meta():
    cfg = C.parse_config(sft.SFTConfig, ["--config", os.path.join(CONFIGS, "sft_7b.yaml")])
    assert (cfg.lr, cfg.warmup_ratio, cfg.epochs, cfg.max_len) == (2e-5, 0.05, 5, 32768)
    assert cfg.global_batch // (cfg.micro_batch * 8) == 8  # grad-accum 8 on 8 GPUs
    assert str(cfg.bf16).lower() == "true" and cfg.distributed == "fsdp" and cfg.gradient_checkpointing
    assert not cfg.freeze_vision and cfg.max_steps == 0
    from transformers import Qwen2_5_VLForConditionalGeneration

    mc = M.published_config("7b")
    t, v = mc.text_config, mc.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (3584, 18944, 28)
    assert (t.num_attention_heads, t.num_key_value_heads, t.vocab_size) == (28, 4, 152064)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and t.rope_parameters["rope_theta"] == 1e6
    vision = (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size)
    assert vision == (32, 1280, 3420, 16, 3584)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31]
    with torch.device("meta"):
        m = Qwen2_5_VLForConditionalGeneration._from_config(mc)
    assert m.lm_head.weight is not m.model.language_model.embed_tokens.weight  # untied
    n = M.count_parameters(m)
    assert abs(n - 8.29e9) / 8.29e9 < 0.01, n


def test_bad_input_is_one_clear_line(tmp_path, monkeypatch):
    """main_guard turns bad data into SystemExit("error: FILE:LINE: field ...") (a non-zero exit, one line)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "problem": "q", "answer": "1"}) + "\n")
    monkeypatch.setattr(sys, "argv", ["sft.py", "--data", str(bad), "--out_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        C.main_guard(sft.train, sft.SFTConfig)
    msg = str(e.value.code)
    assert msg.startswith("error:") and "bad.jsonl:1" in msg and "solution" in msg and "\n" not in msg
    monkeypatch.setattr(sys, "argv", ["sft.py", "--data", str(bad), "--micro_batch", "0"])
    with pytest.raises(SystemExit, match="micro_batch"):
        C.main_guard(sft.train, sft.SFTConfig)


# ----------------------------------------------------------------------------------------------------------
# Slow tier: training runs


FORMAT_RE = re.compile(r"\s*<think>.+?</think>.*\\boxed\{[^{}]+\}", re.S)


@pytest.mark.slow
def test_sft_beats_unigram_and_learns_the_format(sft_tiny):
    """300 steps on the synthetic task (text-only SFT split, synth's default): held-out per-token loss under half
    that of a unigram model of the training targets; greedy answers follow <think>...</think> then \\boxed{}.
    (Images in training are covered by the multi-process and resume tests.)"""
    out, data_dir = sft_tiny
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 301))
    assert all(k in rows[0] for k in ("step", "loss", "lr", "elapsed_s", "tokens", "pad_frac", "grad_norm"))
    m, p = M.load_model(os.path.join(out, "final"))  # final/ loads
    meta = M.read_training_metadata(os.path.join(out, "final"))
    assert meta["stage"] == "sft" and meta["placement"] == "system" and meta["prompt"] == D.REASONING_PROMPT
    tok = p.tokenizer
    train = D.load_records(os.path.join(data_dir, "sft.jsonl"), require_solution=True)
    test = D.load_records(os.path.join(data_dir, "sft_test.jsonl"), require_solution=True)
    counts = torch.zeros(len(tok), dtype=torch.float64)
    for r in train:
        counts += torch.bincount(torch.tensor(D.encode_completion(r.solution, tok)), minlength=len(tok))
    logp_uni = ((counts + 1) / (counts.sum() + len(tok))).log()  # add-one smoothed token frequencies
    held = torch.tensor([t for r in test for t in D.encode_completion(r.solution, tok)])
    unigram = float(-logp_uni[held].mean())
    eval_loss = rows[-1]["eval_loss"]
    print(f"held-out per-token loss {eval_loss:.3f}, unigram {unigram:.3f}")
    assert eval_loss < 0.5 * unigram

    m.eval()
    enc = D.encode_all(test, p, meta["prompt"], meta["placement"])
    ok = 0
    greedy = dict(do_sample=False, top_k=None, top_p=None, temperature=None, repetition_penalty=1.0)
    for s in range(0, len(enc), 25):
        b = D.collate_prompts(enc[s : s + 25], tok.pad_token_id, m.config.image_token_id)
        with torch.no_grad():
            out_ids = m.generate(**b, max_new_tokens=64, **greedy)
        for row in out_ids[:, b["input_ids"].shape[1] :]:
            ok += bool(FORMAT_RE.match(tok.decode(row, skip_special_tokens=True)))
    print(f"format rate {ok / len(enc):.2f} on {len(enc)} held-out prompts")
    assert ok >= 0.9 * len(enc)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """48 SFT records, half with an image, and 16 held out."""
    import synth

    out = str(tmp_path_factory.mktemp("sft_small"))
    sizes = dict(n_sft=48, n_sft_test=16, n_mm_train=0, n_text_train=0, n_mm_test=0, n_text_test=0)
    cfg = synth.SynthConfig(seed=1, mm_share=0.5, **sizes)
    synth.write_synth(out, cfg)
    return out


# global batch 5 with micro-batch 1: two processes get 3 + 2 micro-batches (one zero-weight filler)
STEPS = 6


def small_args(data_dir: str, out_dir: str) -> list[str]:
    data, eval_data = os.path.join(data_dir, "sft.jsonl"), os.path.join(data_dir, "sft_test.jsonl")
    steps = ["--max_steps", str(STEPS), *"--global_batch 5 --micro_batch 1 --lr 3e-3".split()]
    rest = "--save_every 2 --eval_every 3 --log_every 0".split()
    return ["--data", data, "--eval_data", eval_data, "--out_dir", out_dir, *steps, *rest]


@pytest.fixture(scope="module")
def baseline(small_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft_base"))
    r = run_sft(small_args(small_data, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return read_metrics(out), out


def _assert_same(rows, ref, rel):
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(rows, ref):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=rel), (a, b)
        if "eval_loss" in b:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=rel)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_log_the_same_loss_as_one(mode, small_data, baseline, tmp_path):
    ref, ref_out = baseline
    # the premise: some micro-step pairs an image micro-batch on one rank with a text-only one on the other
    ex = D.load_records(os.path.join(small_data, "sft.jsonl"), require_solution=True)
    _, p = M.load_model("tiny")
    lengths = [e.length for e in sft.build_examples(ex, p, sft.SFTConfig(data="x"))]
    order = sft.epoch_order(lengths, 0, 0, 1, True)
    mixed = 0
    for s in range(STEPS):
        items = order[s * 5 : s * 5 + 5]
        r0, r1 = (sft.rank_micro_batches(items, 1, 2, r) for r in (0, 1))
        for a, b in zip(r0, r1):
            mixed += a is not None and b is not None and bool(ex[a[0]].images) != bool(ex[b[0]].images)
    assert mixed > 0

    out = str(tmp_path / mode)
    r = run_sft(small_args(small_data, out) + ["--distributed", mode], nproc=2)
    assert r.returncode == 0, r.stderr[-4000:]
    _assert_same(read_metrics(out), ref, rel=1e-4)
    m, _ = M.load_model(os.path.join(out, "final"))
    m_ref, _ = M.load_model(os.path.join(ref_out, "final"))
    sd, sd_ref = m.state_dict(), m_ref.state_dict()
    assert max(float((sd[k] - sd_ref[k]).abs().max()) for k in sd) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["saved:2", "save:4"])
def test_kill_and_resume_logs_the_same_losses(kill_at, small_data, baseline, tmp_path):
    """`saved:2`: SIGKILL right after the step-2 checkpoint; `save:4`: SIGKILL inside the step-4 checkpoint
    write (shards written, not renamed). Re-running the same command resumes from the newest complete one."""
    ref, _ = baseline
    out = str(tmp_path / "run")
    args = small_args(small_data, out)
    r = run_sft(args, env=_env(REVISUAL_TEST_KILL=kill_at))
    assert r.returncode == -9, r.stderr[-3000:]
    step = int(kill_at.split(":")[1])
    assert not os.path.exists(os.path.join(out, "final"))
    assert C.latest_checkpoint(out).endswith("step_000002")
    assert max(row["step"] for row in read_metrics(out)) == step  # logged past the checkpoint it will resume
    if kill_at.startswith("save:"):
        assert os.path.isdir(os.path.join(out, "ckpt", f"step_{step:06d}.tmp"))
    r = run_sft(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    _assert_same(read_metrics(out), ref, rel=1e-6)
    assert not any(x.endswith(".tmp") for x in os.listdir(os.path.join(out, "ckpt")))
    M.load_model(os.path.join(out, "final"))


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_stop_the_run(small_data, tmp_path):
    out = str(tmp_path / "nan")
    r = run_sft(small_args(small_data, out) + ["--lr", "1e30", "--max_bad_steps", "2", "--grad_clip", "0"])
    assert r.returncode != 0
    assert "non-finite steps in a row" in r.stderr.strip().splitlines()[-1]
    rows = read_metrics(out)
    assert [r["skipped"] for r in rows][-2:] == [1, 1] and rows[-1]["bad_steps"] == 2
    assert all(math.isfinite(r["loss"]) for r in rows)
