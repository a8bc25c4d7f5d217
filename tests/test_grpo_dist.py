"""grpo_mm.py across processes and crashes: the update under torchrun (FSDP2 / DDP, gloo) equals the single-process
one on fixed rollouts; no collective runs inside `generate`; kill -9 and rerun reproduces an uninterrupted run;
metrics.jsonl and rollouts.jsonl agree with each other and with CONTRACT.md.

Multi-process jobs run tests/grpo_worker.py through `python -m torch.distributed.run` (torchrun) on CPU with gloo.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import common as C
import grpo_mm as G
import model as M
from conftest import ROOT

pytestmark = pytest.mark.slow

WORKER = os.path.join(ROOT, "tests", "grpo_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
import grpo_worker as W  # noqa: E402


def _env() -> dict:
    offline = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return dict(os.environ, OMP_NUM_THREADS="1", **offline, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(nproc: int, *args: str, timeout: int = 240) -> None:
    """tests/grpo_worker.py as a plain process (nproc 0) or under torchrun with nproc processes."""
    if nproc == 0:
        cmd = [sys.executable, WORKER, *args]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd = [*torchrun, "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), WORKER, *args]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (
        f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    )


# ----------------------------------------------------------------------------------------------------------
# 1. The update on 2 processes (FSDP2 or DDP) equals the update on 1, on the same fixed rollouts


@pytest.fixture(scope="module")
def update_runs(tmp_path_factory, synth_dir):
    """OUT dirs of the update worker: single process, torchrun x2 with FSDP2, torchrun x2 with DDP."""
    out = {}
    for name, nproc, extra in (
        ("single", 0, []),
        ("fsdp", 2, ["--distributed", "fsdp"]),
        ("ddp", 2, ["--distributed", "ddp"]),
    ):
        out[name] = str(tmp_path_factory.mktemp(f"update_{name}"))
        run_worker(nproc, "update", "--synth", synth_dir, "--out", out[name], *extra)
    return out


def test_fixed_rollouts_pad_drops_some_and_only_rank0_gets_the_image(synth_dir):
    """The fixed rollouts of the worker: PAD keeps the long multimodal sample and four short text ones (dropping
    the rest, both by |A| < t_low and by the rho cap), and balance_over_ranks gives rank 0 only the
    multimodal sample and rank 1 only text: the image pattern differs between the ranks' micro-batches."""
    tok = M.build_tokenizer("tiny")
    samples, gen, picks = W.build_samples(tok)
    records = W.load_case_records(synth_dir)
    n_total = len(samples)
    kept = [i for i, s in enumerate(samples) if s.times_drawn]
    assert sorted(picks) == kept and all(samples[i].times_drawn == 1 for i in kept)
    adv = torch.tensor([s.advantage for s in samples])
    in_e = (adv.abs() >= W.PAD["t_low"]).sum().item()
    assert len(kept) == math.ceil(W.PAD["rho"] * n_total) < in_e < n_total  # rho binds, E drops some too
    mm = [i for i in kept if records[samples[i].rec].images]
    assert mm == [0] and len(samples[0].completion) == W.MM_LEN
    assert all(len(samples[i].completion) < W.MM_LEN / 4 for i in kept if i != 0)
    for name in W.CASES:
        cfg = W.case_config(name, "fsdp")
        plan = G.plan_updates(samples, cfg, 2, torch.Generator().set_state(gen.get_state()))
        assert sum(len(mb) for micro, _ in plan for rank in micro for mb in rank) == len(kept)
        assert all(len(micro[0]) == len(micro[1]) for micro, _ in plan)  # the same micro-batch count per rank
        with_image = [micro for micro, _ in plan if any(0 in mb for rank in micro for mb in rank)]
        assert len(with_image) == 1, (name, plan)
        rank0 = {i for mb in with_image[0][0] for i in mb}
        rank1 = {i for mb in with_image[0][1] for i in mb}
        # the image alone on rank 0, rank 1 text
        assert rank0 == {0} and rank1 and 0 not in rank1, (name, plan)
        if name == "one_update":
            assert len(plan) == 1 and rank1 == set(kept) - {0}
            assert [] in plan[0][0][0]  # rank 0 is padded with a zero-weight filler
        else:
            assert len(plan) == 2  # and the other mini-batch is text-only on both ranks


def _compare_states(got: dict, want: dict, initial: dict, what: str) -> None:
    assert got.keys() == want.keys()
    moved = max((want[k] - initial[k]).abs().max().item() for k in want)
    assert moved > 2e-5, f"{what}: the update hardly moved the weights ({moved})"
    close = {k: torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-4) for k in want}
    bad = {k: (got[k] - want[k]).abs().max().item() for k in want if not close[k]}
    visual = sum(k.startswith("model.visual.") for k in bad)
    largest = ", ".join(f"{k} {v:.2e}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:12])
    assert not bad, (
        f"{what}: {len(bad)} of {len(want)} tensors differ from the single-process update ({visual} of them "
        f"model.visual.*; largest update {moved:.2e}); max abs diff per tensor: {largest}"
    )


def _compare_stats(got: dict, want: dict, what: str) -> None:
    assert got["updates"] == want["updates"], what
    for key in ("loss", "kl", "entropy", "clip_frac", "grad_norm"):
        assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-7), (what, key, got[key], want[key])


@pytest.mark.parametrize("case", list(W.CASES))
@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_two_process_update_equals_single_process(update_runs, backend, case):
    """Same fixed rollouts, same PAD picks: torchrun x2 (FSDP2 via setup_policy / DDP) gives the parameters and
    the logged loss statistics of one process. `two_updates_two_epochs_kl` has a text-only mini-batch."""
    single, multi = update_runs["single"], update_runs[backend]
    want_meta = json.load(open(os.path.join(single, f"{case}.json")))
    got_meta = json.load(open(os.path.join(multi, f"{case}.json")))
    assert want_meta["world"] == 1 and got_meta["world"] == 2
    assert got_meta["wrapped"] == ("DistributedDataParallel" if backend == "ddp" else "FSDPPolicy")
    assert got_meta["picks"] == want_meta["picks"]
    assert not any(0 in mb for micro, _ in got_meta["plan"] for mb in micro[1])  # the image only on rank 0
    initial = torch.load(os.path.join(single, "initial.pt"))
    assert all(torch.equal(initial[k], v) for k, v in torch.load(os.path.join(multi, "initial.pt")).items())
    _compare_states(
        torch.load(os.path.join(multi, f"{case}.pt")),
        torch.load(os.path.join(single, f"{case}.pt")),
        initial,
        f"{backend}/{case}",
    )
    _compare_stats(got_meta["stats"], want_meta["stats"], f"{backend}/{case}")


def test_fsdp_and_ddp_updates_agree(update_runs):
    initial = torch.load(os.path.join(update_runs["single"], "initial.pt"))
    for case in W.CASES:
        _compare_states(
            torch.load(os.path.join(update_runs["ddp"], f"{case}.pt")),
            torch.load(os.path.join(update_runs["fsdp"], f"{case}.pt")),
            initial,
            f"ddp vs fsdp/{case}",
        )


# ----------------------------------------------------------------------------------------------------------
# 2. No collective inside generate on the sharded model


def test_no_collective_inside_generate_on_sharded_model(tmp_path, synth_dir):
    """Rank 0 samples from an image prompt, rank 1 from a text one, inside gathered_for_generation on the FSDP2
    model. The counter (patched torch.distributed functions + a dispatch mode on c10d ops) sees the all-gathers
    of the unshard on entry, of plain forwards before and after, and the per-token all-reduce of a
    synced_gpus=True control, and nothing during grpo_mm.rollout."""
    run_worker(2, "generate", "--synth", synth_dir, "--out", str(tmp_path))
    for rank in (0, 1):
        r = json.load(open(tmp_path / f"generate_rank{rank}.json"))
        assert r["has_image"] == (rank == 0)
        for counts in (r["python"], r["dispatch"]):
            assert counts.get("generate", 0) == 0, (rank, r["names"].get("generate"))
            assert counts.get("enter", 0) > 0, (rank, r["names"])  # the counter works: unshard all-gathers
            assert counts.get("forward_before", 0) > 0 and counts.get("forward_after", 0) > 0, r["names"]
            # and sees a collective in generate
            assert counts.get("generate_synced_control", 0) > 0, r["names"]
        # where FSDP2 looks it up: dist.all_gather_single
        assert r["names"]["enter"].get("all_gather_single", 0) > 0
        # the gathered weights sample what the unsharded model samples
        assert r["completions"] == r["reference"]
        assert len(r["completions"]) == W.N and all(r["completions"])


# ----------------------------------------------------------------------------------------------------------
# 3-4. Whole runs of grpo_mm.py: kill -9 and rerun; log consistency

# rho 0.15: 3 draws of 16, so a step with 4+ nonzero advantages is capped
RUN_ARGS = dict(model="tiny", rollout_batch=4, group_size=4, max_new_tokens=16, mini_batch=16, micro_batch=16)
RUN_ARGS.update(rollout_micro_batch=4, len_budget=8, seed=3, save_every=2, max_steps=6, pad_rho=0.15)


def grpo_cmd(data: str, out_dir: str, **overrides) -> list[str]:
    args = dict(RUN_ARGS, data=data, out_dir=out_dir, **overrides)
    return [sys.executable, os.path.join(ROOT, "grpo_mm.py")] + [f"--{k}={v}" for k, v in args.items()]


def run_grpo(data: str, out_dir: str, **overrides) -> None:
    cmd = grpo_cmd(data, out_dir, **overrides)
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def by_step(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(r["step"], []).append(r)
    return out


@pytest.fixture(scope="module")
def mm_data(synth_dir):
    return os.path.join(synth_dir, "mm_train.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mm_data):
    out = str(tmp_path_factory.mktemp("grpo_uninterrupted"))
    run_grpo(mm_data, out)
    return out


def _complete_rows(path: str) -> list[dict]:
    """Rows of a jsonl being written by another process (a last line without its newline is not there yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    return [json.loads(ln) for ln in lines if ln.endswith("\n")]


def test_kill9_mid_run_then_rerun_matches_uninterrupted(tmp_path, mm_data, uninterrupted):
    out = str(tmp_path / "killed")
    n_seq = RUN_ARGS["rollout_batch"] * RUN_ARGS["group_size"]
    pipes = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.Popen(grpo_cmd(mm_data, out), cwd=ROOT, env=_env(), **pipes, text=True)
    deadline = time.time() + 240
    try:
        # Wait for the step-2 checkpoint (complete: renamed from .tmp) and for every log line of step 3: the kill
        # then lands in step 4, before its checkpoint, with step 3 logged but not checkpointed.
        while True:
            assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "timed out waiting for step 3"
            ckpt_ok = os.path.isfile(os.path.join(out, "ckpt", "step_000002", "state.json"))
            if ckpt_ok:
                step3 = [r for r in _complete_rows(os.path.join(out, "rollouts.jsonl")) if r["step"] == 3]
                if len(step3) == n_seq:
                    break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert C.latest_checkpoint(out).endswith("step_000002"), "the kill landed after the step-4 checkpoint"
    last = max(r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")))
    assert last == 3  # step 3 logged, not saved
    run_grpo(mm_data, out)  # the same command: resumes from step 2

    steps = list(range(1, RUN_ARGS["max_steps"] + 1))
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        for run in (out, uninterrupted):
            rows = read_jsonl(os.path.join(run, name))
            seen = [r["step"] for r in rows]
            if name == "metrics.jsonl":
                assert seen == steps, (run, name, seen)  # each step once, in order
            else:
                assert seen == sorted(seen) and [k for k in by_step(rows)] == steps
                assert all(len(v) == n_seq for v in by_step(rows).values()), (run, name)
    resumed, ref = (by_step(read_jsonl(os.path.join(r, "rollouts.jsonl"))) for r in (out, uninterrupted))
    for step in steps:
        assert [r["prompt_id"] for r in resumed[step]] == [r["prompt_id"] for r in ref[step]], step
        assert [r["reward"] for r in resumed[step]] == [r["reward"] for r in ref[step]], step
        assert [r["completion"] for r in resumed[step]] == [r["completion"] for r in ref[step]], step
        assert [r["times_drawn"] for r in resumed[step]] == [r["times_drawn"] for r in ref[step]], step
    # and the measured peak memory (mem_*_mb): not the run's math
    timing = {"elapsed_s", "rollout_s", "train_s"}
    m_res, m_ref = (read_jsonl(os.path.join(r, "metrics.jsonl")) for r in (out, uninterrupted))
    for a, b in zip(m_res, m_ref):
        for k in {k for k in b if not k.startswith("mem_")} - timing:
            assert math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12), (a["step"], k, a[k], b[k])
    assert any(r["updates"] for r in m_ref), "no update in the run: the comparison would not test the weights"
    sd_res, sd_ref = (M.load_model(os.path.join(r, "final"))[0].state_dict() for r in (out, uninterrupted))
    assert all(torch.equal(sd_res[k], sd_ref[k]) for k in sd_ref)


def test_resume_survives_a_log_line_cut_by_the_kill(tmp_path):
    """kill -9 can land inside JsonlLog.write (a step's rollouts are many lines, flushed in 8 KiB pieces), leaving
    a last line without its end. Resuming must still cut the log back to the checkpoint's step."""
    path = tmp_path / "rollouts.jsonl"
    rows = [{"step": s, "prompt_id": f"p{s}", "reward": 0.5} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "prompt_id": "p4", "rew')
    C.JsonlLog(str(path)).truncate_after(2)
    assert read_jsonl(str(path)) == rows[:2]


def _check_logs(out_dir: str, cfg: dict, pad_mode: str) -> None:
    n = cfg["group_size"]
    n_seq = cfg["rollout_batch"] * n
    metrics = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    rollouts = by_step(read_jsonl(os.path.join(out_dir, "rollouts.jsonl")))
    assert [m["step"] for m in metrics] == list(range(1, cfg["max_steps"] + 1))
    assert sorted(rollouts) == [m["step"] for m in metrics]
    required = (
        "step updates loss lr elapsed_s reward acc format len_reward resp_len zero_adv_frac pad_effective"
    )
    required = (required + " pad_kept kl entropy clip_frac rollout_s train_s").split()
    nontrivial = capped = 0
    for m in metrics:
        assert set(required) <= m.keys(), set(required) - m.keys()
        for k, v in m.items():  # every value a finite number
            finite = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            assert finite, (m["step"], k, v)
        rows = rollouts[m["step"]]
        assert len(rows) == n_seq
        adv_logged = torch.tensor([r["advantage"] for r in rows], dtype=torch.float64)
        for g in range(0, n_seq, n):
            group = rows[g : g + n]
            assert len({r["prompt_id"] for r in group}) == 1, (m["step"], g)
            rw = torch.tensor([r["reward"] for r in group], dtype=torch.float64)
            want = (rw - rw.mean()) / (rw.std(unbiased=True) + 1e-6)
            assert torch.allclose(adv_logged[g : g + n], want, rtol=0, atol=1e-6), (m["step"], g)
        for r in rows:
            assert r["kept"] == (r["times_drawn"] > 0), r
            weighted = cfg.get("w_acc", 0.8) * r["acc"] + cfg.get("w_fmt", 0.1) * r["format"]
            weighted += cfg.get("w_len", 0.1) * r["len_reward"]
            assert math.isclose(r["reward"], weighted, abs_tol=1e-9), r
        kept = sum(r["kept"] for r in rows)
        draws = sum(r["times_drawn"] for r in rows)
        a = adv_logged.abs()
        assert m["zero_adv_frac"] == pytest.approx((a < 1e-6).double().mean().item(), abs=1e-12)
        assert m["pad_kept"] == kept
        assert m["resp_len"] == pytest.approx(sum(r["num_tokens"] for r in rows) / n_seq, abs=1e-9)
        for k in ("reward", "acc", "format", "len_reward"):
            assert m[k] == pytest.approx(sum(r[k] for r in rows) / n_seq, abs=1e-9), k
        if pad_mode == "paper":
            t_low, rho = G.GRPOConfig.pad_t_low, cfg.get("pad_rho", G.GRPOConfig.pad_rho)
            assert m["pad_effective"] == int((a >= t_low).sum()), m["step"]  # t_high = inf
            assert m["pad_kept"] == min(math.ceil(rho * n_seq), m["pad_effective"]), m["step"]
            assert draws == kept  # without replacement
            assert all(r["times_drawn"] == 0 for r in rows if r["advantage"] ** 2 < t_low**2)
            capped += m["pad_kept"] < m["pad_effective"]
        else:  # released: E = {0.03 < |A| < 0.97}, ceil(1.5 N) draws with replacement; E empty -> all once
            assert m["pad_effective"] == int(((a > 0.03) & (a < 0.97)).sum()), m["step"]
            assert draws == (math.ceil(1.5 * n_seq) if m["pad_effective"] else n_seq), m["step"]
            if m["pad_effective"]:
                assert all(r["times_drawn"] == 0 for r in rows if not 0.03 < abs(r["advantage"]) < 0.97)
        assert m["updates"] == math.ceil(draws / cfg["mini_batch"]) * cfg.get("ppo_epochs", 1), m["step"]
        if m["updates"] == 0:
            assert m["loss"] == m["kl"] == m["entropy"] == m["clip_frac"] == 0.0
        assert m["kl"] == 0.0  # kl_coef 0
        nontrivial += m["zero_adv_frac"] < 1.0
    assert nontrivial >= 2, "too few steps with non-zero advantages: the checks above test little"
    if pad_mode == "paper":
        assert capped >= 1, "rho never capped PAD's draws"


def test_logs_consistent_paper(uninterrupted):
    _check_logs(uninterrupted, RUN_ARGS, "paper")


def test_logs_consistent_released(tmp_path, mm_data):
    cfg = dict(RUN_ARGS, pad_mode="released", max_steps=5, save_every=100)
    run_grpo(mm_data, str(tmp_path), pad_mode="released", max_steps=5, save_every=100)
    _check_logs(str(tmp_path), cfg, "released")
