"""Memory model: the bytes each GPU (or, on CPU, each process) holds in every phase of a stage, from the
architecture and the stage's config. The config headers of configs/*_7b.yaml quote its output.

    python memory.py configs/grpo_mm_7b.yaml                  # 8 GPUs (--world 8), the paper's settings
    python memory.py configs/sft_7b.yaml --world=16           # two nodes
    python memory.py configs/grpo_mm_7b.yaml --micro_batch=2  # any config field overridden as on the stage's
                                                              # own command line
Options: --world N (ranks; default 8), --device cuda|cpu (cpu: no foreach AdamW temporaries), --arch 7b|3b
(default: read from the model directory's config.json when it exists, else 7b, or 3b when the model's name says
so; tiny / tiny-qwen are built). The model's parameters are counted exactly (the architecture built on the meta
device); everything else is a formula below, each term named after the tensor it counts.

What it is checked against (tests/test_memory.py): on CPU, `python grpo_mm.py` and `torchrun --nproc_per_node 2
grpo_mm.py` log each phase's measured peak (`mem_rollout_mb`, `mem_update_mb`, `mem_validation_mb` in
metrics.jsonl: peak resident memory above the process's memory before the model was loaded) and the test holds
the model's prediction for the same run within 25%: one process with gradient checkpointing, FSDP2 x2 without.
sft.py logs `mem_step_mb`. On a GPU, bench/gpu.sh compares it with torch.cuda.max_memory_allocated for a 3B
update and a 7B rollout call.

Activations per decoder layer and token, saved for backward (read off autograd's saved tensors for
transformers 5.24's Qwen2.5-VL decoder layer; H hidden, I MLP width, K = kv_heads x head_dim, c bytes of the
compute dtype):
  RMSNorm x 2     fp32: input, normalised, output (12H each); bf16 weights: an fp32 copy, the bf16 normalised
                  and output (8H each); autocast: fp32 input and normalised, plus a bf16 copy of the output per
                  projection that reads it (3 after the first norm, 2 after the second)
  attention       c (2H + 2K): q and k after rotary, v, the output (shared with o_proj's input); with a padding
                  mask sdpa runs without GQA: k and v repeated to every head (+2c(H - K)), and sdpa keeps its own
                  (rows, 1, W, W) copy of the mask in the compute dtype per layer (+c W per token)
  MLP             4cI: gate, up, silu(gate), their product
With gradient checkpointing a layer saves only its input (the residual stream, 4H fp32/autocast, 2H bf16) and
backward recomputes one layer at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

GB = 1e9


@dataclasses.dataclass
class Arch:
    """The shapes and exact parameter counts of one Qwen2.5-VL."""

    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_dim: int  # kv_heads x head_dim
    vocab: int
    vis_depth: int
    vis_hidden: int
    vis_mlp: int
    params: int
    params_vision: int  # vision tower + merger
    params_layer: int  # one decoder layer (an FSDP unit)
    params_root: int  # outside the decoder layers and vision blocks: embeddings, lm_head, patch embed, merger
    largest: int  # the largest single tensor (elements)

    @classmethod
    def from_config(cls, config) -> Arch:
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        with torch.device("meta"):
            m = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
        m.tie_weights()  # `_from_config` leaves a tied lm_head (3B) untied; loading a checkpoint ties it
        tc, vc = config.text_config, config.vision_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        blocks = count(m.model.visual.blocks)
        layers = count(m.model.language_model.layers)
        return cls(
            layers=tc.num_hidden_layers,
            hidden=tc.hidden_size,
            mlp=tc.intermediate_size,
            heads=tc.num_attention_heads,
            kv_dim=tc.num_key_value_heads * head_dim,
            vocab=tc.vocab_size,
            vis_depth=vc.depth,
            vis_hidden=vc.hidden_size,
            vis_mlp=vc.intermediate_size,
            params=count(m),
            params_vision=count(m.model.visual),
            params_layer=count(m.model.language_model.layers[0]),
            params_root=count(m) - blocks - layers,
            largest=max(p.numel() for p in m.parameters()),
        )


@dataclasses.dataclass
class Run:
    """What one rank does in a stage, in the terms the formulas need (`run_from_config` fills it)."""

    stage: str  # sft | grpo
    world: int = 8
    fsdp: bool = True
    precision: str = "bf16"  # fp32 | autocast (one process / DDP with bf16) | bf16 (FSDP2 bf16 compute)
    device: str = "cuda"
    grad_ckpt: bool = True
    rows: int = 4  # sequences per training micro-batch
    width: int = 16384  # tokens per row (the padded width)
    padded: bool = True  # an attention mask is built (rows of different lengths)
    packed: bool = False  # one packed row, attention sequence by sequence (micro_batch_tokens > 0)
    targets: int = 32768  # tokens through lm_head per micro-batch
    patches: int = 0  # vision patches per micro-batch (before the 2 x 2 merge)
    chunk: int = 1024  # Policy.chunk_size: tokens per fp32 logit block
    entropy: bool = True
    vision_trainable: bool = True
    ref: bool = False  # a frozen reference model (KL on)
    slots: int = 0  # rollout decode slots (0: no rollout phase)
    kv_len: int = 0  # longest prompt + max_new_tokens
    prefill_rows: int = 0  # prompts prefilled at the first admission
    prefill_len: int = 0
    prefill_patches: int = 0
    val_rows: int = 0  # in-loop validation: prompts per generate call (0: none)


def _bytes(precision: str) -> tuple[int, int]:
    """(compute, residual-stream) bytes per element."""
    return {"fp32": (4, 4), "autocast": (2, 4), "bf16": (2, 2)}[precision]


def layer_activations(
    hidden: int, mlp: int, kv_dim: int, precision: str, padded: bool, width: int, varlen: bool = False
) -> float:
    """Bytes one decoder layer saves for backward per token (see the module docstring). `varlen`: a packed row
    through policy.varlen_sdpa_attention (no mask, GQA kept; each sequence's own output, then their
    concatenation for o_proj: one more (tokens x H))."""
    c, _ = _bytes(precision)
    norms = {"fp32": 24 * hidden, "bf16": 16 * hidden, "autocast": 26 * hidden}[precision]
    attention = c * (2 * hidden + 2 * kv_dim)
    if padded:
        attention += 2 * c * (hidden - kv_dim) + c * width
    if varlen:
        attention += c * hidden
    return norms + attention + 4 * c * mlp


def backward_temporaries(hidden: int, mlp: int, precision: str) -> float:
    """Bytes per token alive at once inside one layer's backward beyond what it saved: the gradients of the
    residual stream in and out, of the MLP's three (tokens x I) tensors and of the norm's fp32 input."""
    c, r = _bytes(precision)
    return 2 * r * hidden + 3 * c * mlp + 4 * hidden


def resident(a: Arch, run: Run, gradients: bool) -> dict[str, float]:
    """The training state a rank keeps between phases: fp32 master weights, AdamW's two fp32 moments, the
    gradients while they exist (freed after every optimizer step), the frozen reference model. FSDP2 shards
    them over the ranks; one process and DDP hold them whole."""
    w = run.world if run.fsdp else 1
    trainable = a.params - (0 if run.vision_trainable else a.params_vision)
    out = {"weights (fp32 master)": 4 * a.params / w}
    if gradients:
        out["gradients (fp32)"] = 4 * trainable / w
    out["AdamW moments (2 x fp32)"] = 8 * trainable / w
    if run.ref:
        out["reference model (fp32)"] = 4 * a.params / w
    return out


def training_phase(a: Arch, run: Run) -> dict[str, float]:
    """Bytes per rank at the peak of a training micro-batch's forward + backward (after the first micro-batch of
    an optimizer step, when every gradient exists)."""
    c, r = _bytes(run.precision)
    out = resident(a, run, gradients=True)
    # FSDP2: the root unit stays gathered from forward to the end of backward; one layer in use, one prefetched
    if run.fsdp:
        out["gathered weights (root + 2 layers)"] = c * (a.params_root + 2 * a.params_layer)
        out["unsharded gradients (root + 1 layer, + fp32 for the reduce)"] = (
            c * a.params_root + (c + 4) * a.params_layer
        )
    elif run.precision == "autocast":  # autocast keeps a bf16 copy of every weight it cast until backward
        out["autocast bf16 weight copies"] = 2 * a.params
    if not run.fsdp and run.world > 1:  # DDP's buckets: a second copy of the (whole) gradients
        out["DDP gradient buckets"] = out["gradients (fp32)"]
    tokens = run.rows * run.width
    per_layer = layer_activations(a.hidden, a.mlp, a.kv_dim, run.precision, run.padded, run.width, run.packed)
    vis_layer = layer_activations(a.vis_hidden, a.vis_mlp, a.vis_hidden, run.precision, False, 0)
    if run.grad_ckpt:
        saved = tokens * r * a.hidden * a.layers + run.patches * r * a.vis_hidden * a.vis_depth
        out["activations: checkpointed layer inputs"] = saved
        recompute = tokens * (per_layer + backward_temporaries(a.hidden, a.mlp, run.precision))
    else:
        out["activations: every layer"] = (
            tokens * per_layer * a.layers + run.patches * vis_layer * a.vis_depth
        )
        recompute = tokens * backward_temporaries(a.hidden, a.mlp, run.precision)
    # the final norm (its fp32 input and normalised output) and the hidden states that predict the targets
    out["activations: final norm, selected hidden states"] = (
        tokens * 8 * a.hidden + run.targets * c * a.hidden
    )
    if run.padded:
        out["attention mask (bool)"] = run.rows * run.width * run.width
    # policy.ChunkedLogProbs' backward: an fp32 gradient for lm_head (and an fp32 copy of a bf16 lm_head, and the
    # bf16 cast of that gradient), its (chunk x V) fp32 buffer (a second one for the entropy's terms), reused by
    # every chunk, and the selected hidden states in fp32 plus their gradient. It runs first in backward, while
    # every saved activation is still alive.
    chunk = min(run.chunk, run.targets)
    lm = a.vocab * a.hidden
    blocks = (2 if run.entropy else 1) * chunk * a.vocab * 4
    logprob = 4 * lm + (6 * lm if c == 2 and run.fsdp else 0) + blocks + run.targets * a.hidden * (4 + c)
    # the backward peak: the log-prob pass, or (checkpointed) one layer recomputed with its gradients
    if logprob >= recompute:
        out["log-prob backward (lm_head grad + fp32 logit blocks)"] = logprob
    else:
        out["one layer recomputed + its backward" if run.grad_ckpt else "backward temporaries"] = recompute
    return out


def step_phase(a: Arch, run: Run) -> dict[str, float]:
    """The optimizer step: AdamW's foreach path (CUDA) holds one temporary the size of every local parameter
    (sqrt of exp_avg_sq); the single-tensor path (CPU) two of the largest tensor."""
    out = resident(a, run, gradients=True)
    out["AdamW temporaries"] = out["gradients (fp32)"] if run.device == "cuda" else 8 * a.largest
    return out


def generation_phase(a: Arch, run: Run, slots: int, prefill_rows: int, prefill_len: int) -> dict[str, float]:
    """engine.generate with `slots` decode slots, inside a training run: the resident training state (gradients
    freed after the step), the weights it generates with (FSDP2: every unit gathered in bf16), and `engine_parts`."""
    # bytes of the weights it runs with: the units gathered in bf16 (FSDP2), or the fp32 weights themselves
    g = 2 if run.fsdp and run.precision == "bf16" else 4
    out = resident(a, run, gradients=False)
    if run.fsdp:
        out["gathered weights for generation"] = g * a.params
    return out | engine_parts(a, slots, run.kv_len, prefill_rows, prefill_len, run.prefill_patches, g)


def engine_parts(
    a: Arch,
    slots: int,
    kv_len: int,
    prefill_rows: int,
    prefill_len: int,
    patches: int,
    g: int,
) -> dict[str, float]:
    """engine.generate's own memory with weights of `g` bytes: the slot KV cache (allocated once), and one prefill
    forward of the first admission: its prompts' own KV cache, one layer's activations without grad, the masks."""
    from engine import PREFILL_TOKENS

    out = {"KV cache (slots x (prompt + new tokens))": a.layers * 2 * slots * kv_len * a.kv_dim * g}
    # an admission's prompts are prefilled in parts of at most PREFILL_TOKENS padded tokens
    prefill_rows = max(1, min(prefill_rows, PREFILL_TOKENS // max(1, prefill_len)))
    tokens = prefill_rows * prefill_len
    out["prefill: its prompts' KV cache"] = a.layers * 2 * tokens * a.kv_dim * g
    # one layer at a time without grad: q, repeated k and v, attention output, gate, up, silu(gate) * up, the
    # normalised input; plus sdpa's float copy of the mask and transformers' boolean one
    masks = prefill_rows * prefill_len**2 * (g + 1)
    out["prefill: one layer's activations, masks"] = tokens * g * (5 * a.hidden + 3 * a.mlp) + masks
    out["prefill: vision tower (one block)"] = patches * g * (6 * a.vis_hidden + 3 * a.vis_mlp)
    out["decode: fp32 logits"] = slots * a.vocab * (4 + g)
    return out


def phases(a: Arch, run: Run) -> dict[str, dict[str, float]]:
    out = {}
    if run.slots:
        out["rollout"] = generation_phase(a, run, run.slots, run.prefill_rows, run.prefill_len)
    out["update (forward + backward)"] = training_phase(a, run)
    out["optimizer step"] = step_phase(a, run)
    if run.val_rows:
        out["validation"] = generation_phase(a, run, run.val_rows, run.val_rows, run.prefill_len)
    return out


def host_at_load(a: Arch, world: int, fsdp: bool, device: str) -> dict[str, float]:
    """Host memory per rank while loading (model.load_weights + sharding.shard/place_replica(from_rank0)): rank 0
    reads the whole checkpoint in fp32; the others hold one tensor in flight (plus their shard when the device
    is the CPU)."""
    own = 4 * a.params / world if fsdp else 4 * a.params
    return {
        "rank 0": 4 * a.params + (own if device == "cpu" else 0),
        "other ranks": 4 * a.largest + (own if device == "cpu" else 0),
    }


def run_from_config(cfg: dict, world: int, device: str = "cuda", patches_per_image: int | None = None) -> Run:
    """A stage's config (a dict of its fields) -> Run. The worst case the config allows: every row at its
    longest (prompt at max_prompt_len, completion at max_new_tokens; SFT rows at max_len)."""
    bf16 = str(cfg.get("bf16", "auto")).lower()
    on = bf16 == "true" or (bf16 == "auto" and device == "cuda")
    fsdp = world > 1 and cfg.get("distributed", "fsdp") == "fsdp"
    precision = "fp32" if not on else ("bf16" if fsdp else "autocast")
    text_only = cfg.get("freeze_vision", False) or "max_len" in cfg
    if patches_per_image is None:  # one image per prompt at max_pixels (14 x 14 pixels per patch)
        max_pixels = cfg.get("max_pixels", 0) or 12845056  # the checkpoint's own bound
        patches_per_image = 0 if text_only else max_pixels // 196
    run = Run(
        stage="sft" if "max_len" in cfg else "grpo",
        world=world,
        fsdp=fsdp,
        precision=precision,
        device=device,
        grad_ckpt=bool(cfg.get("gradient_checkpointing", False)),
        chunk=int(cfg.get("chunk_size", 1024)),
        vision_trainable=not cfg.get("freeze_vision", False),
    )
    budget = int(cfg.get("micro_batch_tokens", 0) or 0)
    if run.stage == "sft":
        run.entropy = False  # SFT's loss needs no entropy
        run.rows, run.width = int(cfg.get("micro_batch", 1)), int(cfg.get("max_len", 4096))
        run.targets = run.rows * run.width
    else:
        plen, new = int(cfg.get("max_prompt_len", 1024)), int(cfg.get("max_new_tokens", 64))
        run.rows, run.width = int(cfg.get("micro_batch", 32)), plen + new
        run.targets = run.rows * new
        run.ref = float(cfg.get("kl_coef", 0.0)) > 0
        n = int(cfg.get("group_size", 8))
        run.slots = int(cfg.get("rollout_slots", 0) or 0) or int(cfg.get("rollout_micro_batch", 16)) * n
        run.kv_len, run.prefill_len = plen + new, plen
        run.prefill_rows = math.ceil(run.slots / n)
        run.prefill_patches = run.prefill_rows * patches_per_image
        run.val_rows = int(cfg.get("rollout_micro_batch", 16)) * n if cfg.get("eval_data") else 0
    run.patches = run.rows * patches_per_image
    if budget > 0:  # packed: the budget's tokens in one row, no mask (varlen attention)
        run.rows, run.width, run.targets = 1, budget, budget
    run.packed = budget > 0
    run.padded = run.rows > 1 and not run.packed
    return run


def arch_for(model: str, arch: str = "") -> Arch:
    import model as M

    if arch:
        return Arch.from_config(M.published_config(arch))
    if model in ("tiny", "tiny-qwen"):
        return Arch.from_config(M.tiny_config(M.build_tokenizer(model)))
    if os.path.isfile(os.path.join(model, "config.json")):
        from transformers import Qwen2_5_VLConfig

        return Arch.from_config(Qwen2_5_VLConfig.from_pretrained(model, local_files_only=True))
    return Arch.from_config(M.published_config("3b" if "3b" in model.lower() else "7b"))


def report(a: Arch, run: Run, name: str = "") -> str:
    lines = [
        f"Memory model{' for ' + name if name else ''}: {a.params / 1e9:.2f}e9 parameters, {run.world} ranks "
        f"({'FSDP2' if run.fsdp else 'DDP' if run.world > 1 else 'one process'}, {run.precision}, "
        f"gradient checkpointing {'on' if run.grad_ckpt else 'off'}); micro-batch {run.rows} x {run.width} "
        f"tokens, {run.targets} through lm_head, {run.patches} vision patches"
    ]
    for phase, parts in phases(a, run).items():
        lines.append(
            f"  {phase}: {sum(parts.values()) / GB:.1f} GB per {'GPU' if run.device == 'cuda' else 'process'}"
        )
        lines += [f"    {k:<58} {v / GB:7.2f} GB" for k, v in parts.items() if v >= 0.005 * GB]
    other = dataclasses.replace(run, grad_ckpt=not run.grad_ckpt)
    lines.append(
        f"  update with gradient checkpointing {'off' if run.grad_ckpt else 'on'}: "
        f"{sum(training_phase(a, other).values()) / GB:.1f} GB"
    )
    host = host_at_load(a, run.world, run.fsdp, run.device)
    lines.append(
        f"  host RAM at load: rank 0 {host['rank 0'] / GB:.1f} GB, other ranks {host['other ranks'] / GB:.1f} GB "
        f"each (one node of 8: {(host['rank 0'] + 7 * host['other ranks']) / GB:.0f} GB)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("config", help="a stage's YAML config (configs/*.yaml)")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--arch", default="", choices=("", "7b", "3b"))
    args, rest = ap.parse_known_args(argv)
    import yaml

    with open(args.config) as f:
        cfg = yaml.safe_load(f) or {}
    while rest:  # --key=value or --key value overrides, as the stages take them
        key, eq, value = rest.pop(0).removeprefix("--").partition("=")
        if not eq:
            if not rest:
                ap.error(f"--{key} needs a value")
            value = rest.pop(0)
        cfg[key] = yaml.safe_load(value)
    a = arch_for(str(cfg.get("model", "7b")), args.arch)
    print(report(a, run_from_config(cfg, args.world, args.device), os.path.basename(args.config)))


if __name__ == "__main__":
    sys.exit(main())
