"""Stage 1, cold-start SFT: teach the base model the <think> ... </think> \\boxed{} format on reasoning traces.

What it does
------------
Full fine-tuning of Qwen2.5-VL on JSONL records with a `solution` (the whole assistant turn; text-only and
multimodal records may be mixed). Each record becomes chat prompt (with the paper's Fig. 5 reasoning prompt,
placement configurable) + solution + <|im_end|>; the loss is the negative log-likelihood of the assistant
tokens only, closing <|im_end|> included, computed through `policy.Policy`'s chunked fp32 log-probs (the
B x T x V logits never exist). The loss of an optimizer step is

    sum over every target token of the step (all micro-batches, all ranks) of -log p  /  that token count,

so the update does not depend on how the global batch is split over ranks and micro-batches.

Paper settings (Table 5, cold start; configs/sft_7b.yaml)
----------------------------------------------------------
lr 2e-5, cosine schedule with warm-up ratio 0.05, 5 epochs, gradient accumulation 8, max length 32768, bf16,
full fine-tune, on Qwen2.5-VL-7B-Instruct with 8 GPUs.

Where this departs from the paper, or fills in what it leaves open
-------------------------------------------------------------------
* Batch size: the paper gives only grad-accum 8; with 8 GPUs and one sequence per GPU per forward (the
  LLaMA-Factory default its released code builds on) that is a global batch of 64 sequences. Here
  `global_batch` is the sequences per optimizer step over all ranks; the accumulation count follows from it
  (ceil(global_batch / (micro_batch * world))).
* Weight decay 0.0, AdamW betas (0.9, 0.999), eps 1e-8, grad-norm clip 1.0: the paper is silent; these are the
  Hugging Face Trainer / LLaMA-Factory defaults. Decay (when > 0) skips 1-D tensors (biases, norms).
* Warm-up: warmup = ceil(warmup_ratio * total_steps) steps; step t (0-based) uses lr * (t+1)/(warmup+1) during
  warm-up, then lr * 0.5 * (1 + cos(pi * (t - warmup) / (total - warmup))). Unlike the HF schedule, no step
  runs at lr 0.
* Too-long records (prompt + solution > max_len) are an error naming the record (LLaMA-Factory truncates
  them silently); with `skip_bad` they are dropped and counted instead.
* bf16 means bf16 compute with fp32 master weights, gradients and AdamW state (FSDP2 mixed precision, or
  autocast with ddp/none; PITFALLS.md), never bf16 weights; the log-probs come from fp32 logits either way.
* The last optimizer step of an epoch takes the remaining records (fewer than global_batch); the loss is
  still a mean over its tokens.
* `micro_batch_tokens` > 0 (default 0: off, `micro_batch` sequences right-padded as before): a step's
  sequences are packed first-fit decreasing into micro-batches of at most that many tokens, each run as a few
  nearly padding-free rows (`policy.Policy.pack`: block-diagonal causal attention, positions restarting per
  sequence),
  dealt to ranks balanced by tokens with the same count on every rank. The loss is the same token mean; only
  the grouping changes (equal to the padded path to ~1e-6, tests/test_packing.py).
* A micro-batch without images runs the vision tower on a dummy image (output x 0) in every mode, so the
  tower always has a (zero) gradient and AdamW's state evolves the same on 1 or N processes. The released
  (HF Trainer) code leaves such gradients at None, which skips the tower's AdamW step; here a step with no
  image still moves the tower on its AdamW momentum (and decays it when weight_decay > 0).

Distributed: `torchrun --nproc_per_node N sft.py ...` with FSDP2 (`sharding.shard`) or DDP; every rank runs the
same number of micro-batches (zero-weight ones where the global batch does not split evenly), and a rank
whose micro-batch has no image still runs the vision tower (on a dummy image, output x 0), so collectives
always match. Checkpoints (`out_dir/ckpt/step_NNNNNN`, common.save_checkpoint) hold the sharded model and
optimizer, every rank's RNG, the step (which fixes the lr) and the data position (epoch, index into that
epoch's order; the order is a function of (seed, epoch) only). Re-running the same command continues from
the newest complete checkpoint and cuts metrics.jsonl back to it. The final model goes to `out_dir/final`
(Hugging Face format, with {"prompt", "placement", "stage": "sft"} in revisual.json). Tests simulate crashes
with REVISUAL_TEST_KILL="save:STEP" (SIGKILL inside the checkpoint write, before its rename) or "saved:STEP"
(right after it); see common.debug_kill_hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

import common as C
import data as D
import model as M
import policy as P
import sharding as SH

log = logging.getLogger("sft")


@dataclass
class SFTConfig:
    """Cold-start SFT (stage 1). Defaults suit the built-in tiny model; the 7B values are in the comments
    and in configs/sft_7b.yaml."""

    model: str = "tiny"  # 7B: Qwen2.5-VL-7B-Instruct directory
    data: str = ""  # JSONL with `solution` (several comma-separated); required
    eval_data: str = ""  # held-out JSONL with `solution`, for eval_loss (optional)
    out_dir: str = "out/sft"  # metrics.jsonl, ckpt/, final/ (the next stage's --model)
    max_steps: int = 0  # > 0: exactly this many optimizer steps (overrides epochs)
    epochs: float = 5.0  # paper: 5
    lr: float = 2e-5  # paper: 2e-5 (the tiny runs pass a larger one)
    warmup_ratio: float = 0.05  # paper: 0.05
    weight_decay: float = 0.0  # paper silent; HF Trainer default
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # paper silent; AdamW default
    adam_eps: float = 1e-8  # paper silent; AdamW default
    global_batch: int = 16  # sequences per optimizer step over all ranks; 7B: 64 (8 GPUs x 1 x accum 8)
    micro_batch: int = 8  # sequences per forward per rank; 7B: 1
    micro_batch_tokens: int = 0  # > 0: padding-free micro-batches of up to this many tokens; 0: micro_batch
    max_len: int = 32768  # paper: 32768 (prompt + solution tokens)
    grad_clip: float = 1.0  # max grad norm (0 = off); paper silent, HF default
    seed: int = 0  # the tiny model's init and the data order derive from it
    save_every: int = 100  # optimizer steps between checkpoints (0 = none)
    keep_checkpoints: int = 2  # newest checkpoints kept under out_dir/ckpt
    eval_every: int = 50  # optimizer steps between eval_loss measurements (0 = only at the end)
    resume: str = "auto"  # auto: newest checkpoint in out_dir if any; false: start over; or a checkpoint path
    distributed: str = "fsdp"  # fsdp | ddp: how several processes share the model (one process: neither)
    dist_timeout_min: int = 180  # collective timeout (minutes)
    bf16: str = "auto"  # auto: on with CUDA; true | false (bf16 compute, fp32 master weights)
    gradient_checkpointing: bool = False  # 7B: true
    freeze_vision: bool = False  # paper: full fine-tune
    image_dir: str = ""  # folder for relative image paths ("" = each JSONL file's own folder)
    min_pixels: int = 0  # images resized to at least this many pixels (0: the checkpoint's own bound)
    max_pixels: int = 0  # and at most this many: max_pixels / 784 tokens per image (0: the checkpoint's own)
    group_by_length: bool = True  # micro-batches of similar length (less padding)
    prompt: str = ""  # "" = what the starting checkpoint was trained with (else the paper's Fig. 5 prompt)
    placement: str = ""  # system (paper Fig. 5) | user (released code); "" = the checkpoint's, else system
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run
    skip_bad: bool = False  # drop (and count) bad or too-long records instead of stopping
    chunk_size: int = 1024  # tokens per lm_head chunk of the log-prob computation
    log_every: int = 10  # steps between console lines (0 = none); metrics.jsonl and wandb get every step
    wandb_project: str = ""  # log to Weights & Biases when set and wandb imports


# ----------------------------------------------------------------------------------------------------------
# Schedule and data plan (pure functions; the tests call them)


def warmup_steps(total: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total)


def lr_at(step: int, total: int, base_lr: float, warmup_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`: linear warm-up, then cosine to 0."""
    w = warmup_steps(total, warmup_ratio)
    if step < w:
        return base_lr * (step + 1) / (w + 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


@dataclass
class Example:
    prompt: D.EncodedPrompt
    completion: list[int]  # solution tokens + <|im_end|> (the targets)

    @property
    def length(self) -> int:
        return len(self.prompt.input_ids) + len(self.completion)


def epoch_order(
    lengths: list[int], seed: int, epoch: int, micro_batch: int, group_by_length: bool
) -> list[int]:
    """The order of an epoch: a function of (seed, epoch) only (not of the world size), so resume is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if group_by_length:
        return D.length_grouped_order(lengths, micro_batch, g)
    return torch.randperm(len(lengths), generator=g).tolist()


def rank_micro_batches(
    items: list[int],
    micro_batch: int,
    world: int,
    rank: int,
    lengths: list[int] | None = None,
    budget: int = 0,
) -> list[list[int] | None]:
    """This rank's micro-batches of a step: the step's items cut into runs of `micro_batch` (consecutive in the
    length-grouped order), dealt round-robin to ranks. Every rank gets the same count; `None` is a zero-weight
    filler (it still runs forward/backward so the collectives match).

    `budget` > 0: the items are packed instead (data.packed_micro_batches: first-fit decreasing into micro-batches
    of at most `budget` tokens of `lengths`, balanced over ranks by tokens); the same count and fillers."""
    if budget > 0:
        mine = D.packed_micro_batches(items, lengths, budget, world)
        count = max(len(p) for p in mine)
        return mine[rank] + [None] * (count - len(mine[rank]))
    chunks = [items[i : i + micro_batch] for i in range(0, len(items), micro_batch)]
    per_rank = math.ceil(len(chunks) / world)
    return [chunks[k * world + rank] if k * world + rank < len(chunks) else None for k in range(per_rank)]


def filler_items(items: list[int], cfg: SFTConfig, lengths: list[int]) -> list[int]:
    """What a zero-weight filler micro-batch runs: a plain micro-batch's worth of the step's items, or with
    packing the step's shortest item alone (a filler's only job is to take part in the collectives)."""
    return [min(items, key=lambda i: lengths[i])] if cfg.micro_batch_tokens > 0 else items[: cfg.micro_batch]


def accumulation(cfg: SFTConfig, lengths: list[int], world: int) -> str:
    """Micro-batches per rank in a step, for the start-up log: with packing the count depends on the step's
    lengths, so it is the range over the first epoch's steps (e.g. "2-3")."""
    counts = {
        len(rank_micro_batches(items, cfg.micro_batch, world, 0, lengths, cfg.micro_batch_tokens))
        for items in epoch_steps(lengths, cfg, 0)
    }
    return str(min(counts)) if len(counts) == 1 else f"{min(counts)}-{max(counts)}"


def epoch_steps(lengths: list[int], cfg: SFTConfig, epoch: int) -> list[list[int]]:
    """The items of each step of an epoch (the last step takes what is left)."""
    order = epoch_order(lengths, cfg.seed, epoch, cfg.micro_batch, cfg.group_by_length)
    return [order[i : i + cfg.global_batch] for i in range(0, len(order), cfg.global_batch)]


def computed_tokens(micro_batches: list[list[int]], lengths: list[int], packed: bool) -> int:
    """Token slots a forward computes over these micro-batches: one row per sequence as long as the longest
    (padded), or the rows of data.pack_rows (packed)."""
    slots = D.packed_slots if packed else (lambda ls: len(ls) * max(ls))
    return sum(slots([lengths[i] for i in mb]) for mb in micro_batches)


def token_mean_loss(nll_sums: list[torch.Tensor], global_tokens: int, world: int) -> torch.Tensor:
    """The loss a rank backpropagates: its summed NLL over the step's GLOBAL target-token count, times the
    world size because DDP and FSDP average gradients over ranks (so the update is the global token mean)."""
    return sum(nll_sums) * (world / global_tokens)


# ----------------------------------------------------------------------------------------------------------
# Set-up helpers


def validate(cfg: SFTConfig) -> None:
    if not cfg.data:
        raise C.ConfigError("--data is required (JSONL records with a 'solution' field)")
    for name in ("global_batch", "micro_batch", "max_len", "chunk_size", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            raise C.ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.micro_batch_tokens < 0:
        raise C.ConfigError(f"--micro_batch_tokens must be >= 0 (0 = off), got {cfg.micro_batch_tokens}")
    if cfg.max_steps < 0 or cfg.epochs <= 0 and cfg.max_steps == 0:
        raise C.ConfigError("set --max_steps > 0 or --epochs > 0")
    C.check_choice("placement", cfg.placement, ("", *D.PLACEMENTS))
    C.check_choice("distributed", cfg.distributed, ("fsdp", "ddp"))
    C.check_choice("bf16", str(cfg.bf16).lower(), ("auto", "true", "false"))
    if len(cfg.betas) != 2:
        raise C.ConfigError(f"--betas needs two values, got {cfg.betas}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise C.ConfigError(f"--warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")


def build_examples(records: list[D.Record], processor, cfg: SFTConfig) -> list[Example]:
    """Encode prompts (images processed once) and solutions; enforce max_len (error, or drop with skip_bad)."""
    prompt, placement = M.recorded_prompt(cfg.model, cfg.prompt, cfg.placement)
    prompts = D.encode_all(records, processor, prompt, placement, skip_bad=cfg.skip_bad)
    out, dropped = [], 0
    for p in prompts:
        ex = Example(p, D.encode_completion(p.record.solution or "", processor.tokenizer))
        if ex.length > cfg.max_len:
            msg = (
                f"{p.record.source}: field 'solution': prompt + solution is {ex.length} tokens, "
                f"over max_len {cfg.max_len}"
            )
            if not cfg.skip_bad:
                raise D.DataError(msg)
            dropped += 1
            log.warning("dropped (%d so far): %s", dropped, msg)
            continue
        out.append(ex)
    if dropped:
        log.warning("dropped %d record(s) over max_len %d", dropped, cfg.max_len)
    if not out:
        raise D.DataError(f"{cfg.data}: no usable records")
    return out


def collate(examples: list[Example], pad_id: int, image_token_id: int, device) -> dict:
    """data.collate_sequences (what data.collate_sft does, with the solutions tokenised once up front)."""
    prompts, completions = [e.prompt for e in examples], [e.completion for e in examples]
    b = D.collate_sequences(prompts, completions, pad_id, image_token_id)
    b.pop("labels")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


def choose_mode(cfg: SFTConfig, d: C.Dist) -> tuple[str, bool]:
    """(distributed mode: fsdp | ddp, or none for one process; bf16)."""
    return (cfg.distributed if d.world > 1 else "none"), C.resolve_bf16(cfg.bf16, d)


def wrap(policy: P.Policy, mode: str, bf16: bool, d: C.Dist, from_rank0: bool = False) -> torch.nn.Module:
    """Shard (fsdp), replicate (ddp) or place (one process) the policy; `from_rank0`: only rank 0 read the
    checkpoint, the other ranks built on the meta device and receive its weights (sharding.shard / place_replica)."""
    # A micro-batch without an image runs the tower on a dummy image (output x 0), in every mode: FSDP2's
    # all-gathers then match across ranks, DDP needs no find_unused_parameters, and the tower always gets a
    # (zero) gradient, so AdamW treats it the same whatever the world size (a None gradient would skip its
    # moment update on one process but not on two). With weight_decay > 0 this also decays an unused tower.
    policy.always_run_vision = True
    if mode == "fsdp":
        return SH.shard(policy, param_dtype=torch.bfloat16 if bf16 else None, from_rank0=from_rank0)
    SH.place_replica(policy, d.device, from_rank0)
    if mode == "ddp":
        device_ids = [d.local_rank] if d.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(policy, device_ids=device_ids)
    return policy


def make_optimizer(module: torch.nn.Module, cfg: SFTConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)


def grad_norm_and_clip(module: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def open_wandb(cfg: SFTConfig, d: C.Dist):
    if not (cfg.wandb_project and d.main):
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb_project is set but wandb does not import: not logging to wandb")
        return None
    name = os.path.basename(os.path.abspath(cfg.out_dir))
    config = dataclasses.asdict(cfg)
    return wandb.init(project=cfg.wandb_project, name=name, config=config, dir=cfg.out_dir, resume="allow")


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_loss(
    wrapped, examples: list[Example], cfg: SFTConfig, d: C.Dist, pad_id: int, image_token_id: int
) -> float:
    """Per-token NLL on held-out examples; micro-batches by length, dealt to ranks (same count on every rank)."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    lengths = [e.length for e in examples]
    wrapped.eval()
    nll = torch.zeros(2, dtype=torch.float64)
    for chunk in rank_micro_batches(order, cfg.micro_batch, d.world, d.rank, lengths, cfg.micro_batch_tokens):
        items = chunk or filler_items(order, cfg, lengths)
        batch = collate([examples[i] for i in items], pad_id, image_token_id, d.device)
        logp, _ = wrapped(**batch)
        if chunk is not None:
            mask = batch["target_mask"]
            nll += torch.tensor([-(logp * mask).sum().item(), mask.sum().item()], dtype=torch.float64)
    wrapped.train()
    nll = C.all_reduce_sum(nll.to(d.device), d).cpu()
    return float(nll[0] / nll[1])


# ----------------------------------------------------------------------------------------------------------
# Training


def train(cfg: SFTConfig) -> str:
    """Run the stage; returns the path of the final model."""
    validate(cfg)
    prompt, placement = M.recorded_prompt(cfg.model, cfg.prompt, cfg.placement)
    cfg = dataclasses.replace(cfg, prompt=prompt, placement=placement)
    d = C.init_distributed(timeout_min=cfg.dist_timeout_min)
    level = logging.INFO if d.main else logging.WARNING
    logging.basicConfig(level=level, format=f"[sft rank {d.rank}] %(levelname)s %(message)s")
    mode, bf16 = choose_mode(cfg, d)
    memory = C.PhaseMemory(d.device)  # each step's peak, logged as mem_step_mb (memory.py models it)
    C.seed_everything(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)

    # Data
    load = dict(require_solution=True, skip_bad=cfg.skip_bad, image_dir=cfg.image_dir)
    train_rec = D.load_records(cfg.data, **load)  # bad input fails fast
    eval_rec = D.load_records(cfg.eval_data, **load) if cfg.eval_data else []
    from_rank0 = d.on and os.path.isdir(cfg.model)  # a checkpoint: read by rank 0 only (sharding.shard)
    model, processor = M.load_model(cfg.model, seed=cfg.seed, on_meta=from_rank0 and not d.main)
    tok, image_token_id = processor.tokenizer, model.config.image_token_id
    M.set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    train_ex = build_examples(train_rec, processor, cfg)
    eval_ex = build_examples(eval_rec, processor, cfg) if eval_rec else []
    lengths = [e.length for e in train_ex]
    n = len(train_ex)
    steps_per_epoch = math.ceil(n / cfg.global_batch)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    micro = f"{cfg.micro_batch_tokens} tokens (packed)" if cfg.micro_batch_tokens else str(cfg.micro_batch)
    with_images = sum(e.prompt.pixel_values is not None for e in train_ex)
    args = (n, with_images, len(eval_ex), total, steps_per_epoch)
    args += (cfg.global_batch, d.world, accumulation(cfg, lengths, d.world), micro, mode, bf16)
    log.info(
        "%d train records (%d with images), %d eval; %d steps (%d per epoch), global batch %d = %d ranks x "
        "%s micro-batches x %s; mode %s, bf16 %s",
        *args,
    )

    # Model, optimizer
    policy = P.Policy(model, chunk_size=cfg.chunk_size)
    policy.pack = cfg.micro_batch_tokens > 0  # each micro-batch run as packed rows (policy.Policy.pack)
    M.set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    M.freeze_vision(model, cfg.freeze_vision)
    policy.train()
    wrapped = wrap(policy, mode, bf16, d, from_rank0)
    # bf16 without FSDP: autocast (weights stay fp32; token_logprobs turns it off for the fp32 logits).
    autocast = contextlib.nullcontext
    if bf16 and mode != "fsdp":
        autocast = functools.partial(torch.autocast, d.device.type, dtype=torch.bfloat16)
    optimizer = make_optimizer(wrapped, cfg)

    # Resume
    step, epoch, index, bad_streak, bad_total, elapsed_before = 0, 0, 0, 0, 0, 0.0
    ckpt = C.resolve_resume(cfg.resume, cfg.out_dir, d)
    if ckpt:
        state = C.load_checkpoint(ckpt, wrapped, optimizer, d)
        step, epoch, index = state["step"], state["epoch"], state["index"]
        bad_streak, bad_total, elapsed_before = state["bad_streak"], state["bad_total"], state["elapsed_s"]
        if state.get("global_batch") != cfg.global_batch or state.get("n_records") != n:
            log.warning(
                "resuming %s with a different global_batch or data size: the data position may shift", ckpt
            )
        log.info("resumed from %s (step %d, epoch %d, index %d)", ckpt, step, epoch, index)
    metrics = C.JsonlLog(os.path.join(cfg.out_dir, "metrics.jsonl"), enabled=d.main)
    metrics.truncate_after(step)
    C.barrier(d)

    run = open_wandb(cfg, d)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not d.main, desc="sft", dynamic_ncols=True)
    orders: dict[int, list[int]] = {}
    t_start = time.time()
    while step < total:
        if epoch not in orders:
            orders = {epoch: epoch_order(lengths, cfg.seed, epoch, cfg.micro_batch, cfg.group_by_length)}
        items = orders[epoch][index : index + cfg.global_batch]
        t0 = time.time()
        memory.reset()
        mine = rank_micro_batches(items, cfg.micro_batch, d.world, d.rank, lengths, cfg.micro_batch_tokens)
        local_tokens = sum(len(train_ex[i].completion) for mb in mine if mb for i in mb)
        global_tokens = int(C.all_reduce_sum(torch.tensor([local_tokens], device=d.device), d).item())

        # Forward/backward over this rank's micro-batches. DDP syncs gradients only on the last one; FSDP2
        # reduce-scatters after each (keeping unsharded gradients across micro-batches would cost their memory).
        nll_local = 0.0
        for k, mb in enumerate(mine):
            mb_items = mb or filler_items(items, cfg, lengths)
            batch = collate([train_ex[i] for i in mb_items], tok.pad_token_id, image_token_id, d.device)
            sync = mode != "ddp" or k == len(mine) - 1
            with contextlib.nullcontext() if sync else wrapped.no_sync():
                with autocast():
                    logp, _ = wrapped(**batch)
                nll = -(logp * batch["target_mask"]).sum() * (1.0 if mb else 0.0)  # a filler weighs 0
                token_mean_loss([nll], global_tokens, d.world).backward()
            nll_local += nll.item()
        nll_sum = C.all_reduce_sum(torch.tensor([nll_local], dtype=torch.float64, device=d.device), d)
        loss = float(nll_sum.item())
        loss /= global_tokens

        lr = lr_at(step, total, cfg.lr, cfg.warmup_ratio)
        grad_norm = grad_norm_and_clip(wrapped, cfg.grad_clip) if math.isfinite(loss) else float("nan")
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            bad_streak, bad_total = bad_streak + 1, bad_total + 1
        else:
            bad_streak = 0
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Advance the data position: the last step of an epoch takes what is left.
        step += 1
        index += len(items)
        if index >= n:
            epoch, index = epoch + 1, 0
        dt = time.time() - t0
        seq_tokens = sum(lengths[i] for i in items)
        # every rank's real micro-batches (the plan is the same function on every rank)
        plan = [
            mb
            for r in range(d.world)
            for mb in rank_micro_batches(items, cfg.micro_batch, d.world, r, lengths, cfg.micro_batch_tokens)
            if mb
        ]
        padded = computed_tokens(plan, lengths, cfg.micro_batch_tokens > 0)
        row = {
            "step": step,
            "epoch": round(epoch + index / n, 4),
            "loss": loss if not skipped else 0.0,
            "lr": lr,
            "grad_norm": grad_norm if not skipped else 0.0,
            "tokens": global_tokens,
            "seq_tokens": seq_tokens,
            "pad_frac": 1.0 - seq_tokens / padded,
            "tokens_per_s": seq_tokens / max(dt, 1e-9),
            "skipped": int(skipped),
            "bad_steps": bad_total,
            "mem_step_mb": memory.peak_mb(),
        }
        if eval_ex and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            with autocast():
                row["eval_loss"] = eval_loss(wrapped, eval_ex, cfg, d, tok.pad_token_id, image_token_id)
        row["elapsed_s"] = elapsed_before + time.time() - t_start
        metrics.write(row)
        if run is not None:
            run.log(row, step=step)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{lr:.2e}")
        bar.update(1)
        if d.main and cfg.log_every and step % cfg.log_every == 0:
            bar.write(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            )
        if skipped:
            msg = "step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped (%d in a row)"
            log.warning(msg, step, loss, grad_norm, bad_streak)
            if bad_streak >= cfg.max_bad_steps:
                bar.close()
                sys.exit(
                    f"error: {bad_streak} non-finite steps in a row (up to step {step}), stopping; "
                    f"lower --lr or check the data (last checkpoint: {C.latest_checkpoint(cfg.out_dir)})"
                )

        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            state = {
                "epoch": epoch,
                "index": index,
                "bad_streak": bad_streak,
                "bad_total": bad_total,
                "elapsed_s": row["elapsed_s"],
                "global_batch": cfg.global_batch,
                "n_records": n,
                "scheduler": {"step": step, "total": total, "warmup": warmup_steps(total, cfg.warmup_ratio)},
            }
            C.save_checkpoint(cfg.out_dir, step, wrapped, optimizer, state, d, keep=cfg.keep_checkpoints)
            C.debug_kill_hook("saved", step)
    bar.close()

    # Final model: gathered on every rank, written by rank 0.
    final = os.path.join(cfg.out_dir, "final")
    state_dict = SH.full_state_dict(policy)
    if d.main:
        meta = dict(prompt=cfg.prompt, placement=cfg.placement, stage="sft", base_model=cfg.model, steps=step)
        M.save_model(policy.model, processor, final, metadata=meta, state_dict=state_dict)
        log.info("final model written to %s", final)
    C.barrier(d)
    if run is not None:
        run.finish()
    return final


if __name__ == "__main__":
    C.main_guard(train, SFTConfig)
