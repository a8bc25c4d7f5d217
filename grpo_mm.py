"""Stage 2, multimodal RL: GRPO written by hand, with the zero-advantage filter, PAD and the efficient-length
reward (ReVisual-R1, arXiv 2506.04207, Section 4.1; equation numbers below are the paper's).

One rollout step:
  1. each rank samples `group_size` completions for its share of `rollout_batch` prompts with `generate` semantics
     (a complete generation config: the checkpoint's own top_k=1 never leaks in; vision tokens suppressed):
     engine.py's continuous-batching engine by default (the same tokens as HF `generate` under greedy decoding
     and the same temperature/top-p distribution, tests/test_engine.py and tests/test_bench.py; one prefill per
     group; no sort of the vocabulary), sampling.py's micro-batched decode loop with `--rollout_engine=false`,
     HF `model.generate` itself with `--hf_generate` (prompts expanded n times before the prefill);
  2. reward = w_acc * acc + w_fmt * format + w_len * R_len      (R_len: Eq. 5-6, reward.length_reward);
  3. group advantages A_i = (r_i - mean_g) / (std_g + 1e-6)      (GRPO; unbiased std as the released code);
  4. PAD (Algorithm 1) picks the sequences to train on, the same choice on every rank;
  5. ceil(k' / mini_batch) AdamW updates per ppo epoch on the token-level clipped loss (`grpo.policy_loss`)
     + kl_coef * k3 KL - beta_t * entropy, averaged over the global token count of each mini-batch.

Where this departs from the paper (PAPER.md lists the sources):
  - PAD: the paper gives no T_low, T_high, rho. Defaults T_low = 0.03 (released code), T_high = inf (the
    released 0.97 drops the minority answers of a group, its most informative rollouts), rho = 0.5,
    tau linear 1.0 -> 0.3 over the run (Table 5's 0.3 is its end value). `pad_mode="released"` is the released
    code's variant: strict bounds 0.03 < |A| < 0.97, p ~ (|A| + 1e-8)^1.5, 1.5 N draws with replacement,
    the full batch when E is empty. `"filter"` keeps all of E; `"off"` is plain GRPO.
  - Clipping: the paper gives no epsilon; the released code's clip-higher (0.2 / 0.25), dual-clip c = 3 and
    log-ratio clamp [ln 1e-3, ln 1e3] are the defaults.
  - KL: omitted in this stage (paper), so no reference model is loaded (kl_coef = 0).
  - Entropy bonus with warm-up and exponential decay (Table 5), in both RL stages (project choice; the tiny
    pipeline, run.sh, turns it off here: on the synthetic task it cost text accuracy, BENCHMARKS.md).
  - Truncated completions are graded as they are and kept in the loss (`truncation="keep"`); "mask" leaves
    them out of the update (they still count in their group's advantage).
  - `micro_batch_tokens` > 0 (default 0: off): the update's micro-batches are packed by tokens (prompt +
    completion, first-fit decreasing, balanced over ranks) and run padding-free (policy.Policy.pack), in place
    of `micro_batch` sequences with the group's prompt shared (`share_prefix`); the loss is unchanged.
Launch: `python grpo_mm.py --key=value ...` (one CPU) or `torchrun --nproc_per_node 8 grpo_mm.py --config
configs/grpo_mm_7b.yaml`. grpo_text.py runs this same loop with text data and the vision tower frozen.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import common as C
import data as D
import engine as E
import grpo
import model as M
import policy as P
import reward as R
import sampling as S
import sharding as SH


@dataclass
class GRPOConfig:
    """Multimodal GRPO (stage 2). Defaults run the tiny model on CPU; configs/grpo_mm_7b.yaml has Table 5's."""

    model: str = "tiny"  # HF dir (sft.py's final/), or tiny / tiny-qwen
    data: str = "out/synth/mm_train.jsonl"  # JSONL records with `answer` (several comma-separated)
    eval_data: str = ""  # held-out split for in-loop validation (greedy accuracy)
    out_dir: str = "out/grpo_mm"  # metrics.jsonl, rollouts.jsonl, ckpt/, final/
    max_steps: int = 60  # rollout steps (paper: 200, released code)
    seed: int = 0  # prompts order, PAD draws and rollout sampling derive from it
    save_every: int = 20  # rollout steps between checkpoints (0: only at the end)
    eval_every: int = 0  # 0: only at the end
    eval_limit: int = 200  # first N records of eval_data
    resume: str = "auto"  # auto: newest checkpoint in out_dir if any; false: start over; or a checkpoint path
    # rollouts
    rollout_batch: int = 16  # prompts per step, global (paper: 512)
    group_size: int = 8  # completions per prompt (n in the paper; not `n`: torchrun would swallow `--n`)
    rollout_micro_batch: int = 16  # prompts per generate call per rank (memory knob; without the engine)
    rollout_engine: bool = True  # engine.py's continuous batching over all of a rank's sequences (False: one
    # sampling.generate call per rollout_micro_batch prompts, the decode loop before issue 16)
    rollout_slots: int = 0  # engine decode slots per rank (KV memory); 0: rollout_micro_batch x group_size
    temperature: float = 1.0  # sampling temperature (paper 1.0); log-probs use logits / temperature
    top_p: float = 0.95  # paper Table 5
    max_prompt_len: int = 1024  # paper: 8192; longer prompts are dropped at start (counted and printed)
    min_pixels: int = 0  # images resized to at least this many pixels (0: the checkpoint's own bound)
    max_pixels: int = 0  # and at most this many: max_pixels / 784 tokens per image (0: the checkpoint's own)
    max_new_tokens: int = 64  # paper: 8192
    min_new_tokens: int = 0  # 0: none (benchmarks set it to max_new_tokens for equal work)
    hf_generate: bool = False  # sample with HF `model.generate` itself (same distribution, slower on CPU)
    truncation: str = "keep"  # keep | mask
    # update
    mini_batch: int = 64  # sequences per optimizer update, global (paper: 128 prompts x 8 = 1024 sequences)
    micro_batch: int = 32  # sequences per forward/backward per rank (memory knob)
    micro_batch_tokens: int = 0  # > 0: padding-free micro-batches of up to this many tokens; 0: micro_batch
    ppo_epochs: int = 1  # passes over the kept sequences per rollout step
    lr: float = 5e-5  # paper: 1e-6 (7B); the tiny model needs more, and forgets at >= 1e-4
    weight_decay: float = 1e-2  # paper Table 5
    grad_clip: float = 1.0  # max grad norm (paper Table 5)
    max_bad_steps: int = 5  # this many non-finite optimizer steps in a row stop the run (each is skipped)
    clip_low: float = 0.2  # PPO clip eps_low (released code)
    clip_high: float = 0.25  # clip-higher eps_high (released code)
    dual_clip: float = 3.0  # 0 disables
    logratio_clamp: float = math.log(1e3)  # |log ratio| bound before exp (released code)
    kl_coef: float = 0.0  # k3 ("low_var_kl"); 0 in this stage (paper)
    kl_clamp: float = 10.0  # per-token k3 clamp (released code)
    entropy_beta0: float = 0.02  # Table 5 beta_0
    entropy_beta_min: float = 0.0  # Table 5 beta_min
    entropy_decay: float = 0.985  # Table 5 lambda, per rollout step
    entropy_warmup: int = 140  # steps with beta = 0 (paper tau_w; released code: 20)
    # PAD (Algorithm 1)
    pad_mode: str = "paper"  # paper | released | filter | off
    pad_t_low: float = 0.03  # E = {T_low <= |A| <= T_high} (Algorithm 1); released code 0.03
    pad_t_high: float = math.inf  # inf: the released 0.97 drops the minority answers (PAPER.md)
    pad_rho: float = 0.5  # k' = min(ceil(rho N), |E|)
    pad_tau_start: float = 1.0  # PAD temperature, linear from start to end over the run
    pad_tau_end: float = 0.3  # Table 5
    # reward
    w_acc: float = 0.8  # reward = w_acc acc + w_fmt format + w_len R_len
    w_fmt: float = 0.1  # weight of the format reward (<think>...</think> then a \boxed answer)
    w_len: float = 0.1  # weight of the efficient-length reward R_len (Eq. 5-6)
    len_budget: int = 48  # tiny models; 4096 in the 7B configs
    len_alpha: float = 0.005  # Eq. 5
    len_delta: float = 0.5  # Eq. 5
    grade_workers: int = 1  # processes grading completions (math-verify under a time limit)
    # model
    prompt: str = ""  # "" = what the starting checkpoint was trained with (else the paper's Fig. 5 prompt)
    placement: str = ""  # system | user; "" = as the checkpoint recorded (else system)
    freeze_vision: bool = False  # vision tower and merger frozen (grpo_text: true)
    image_dir: str = ""  # folder for relative image paths ("" = each JSONL file's own folder)
    gradient_checkpointing: bool = False  # 7B: true
    bf16: str = "auto"  # auto: on with CUDA; true | false (bf16 compute, fp32 master weights)
    distributed: str = "fsdp"  # fsdp | ddp: how several processes share the model (one process: neither)
    dist_timeout_min: int = 180  # collective timeout (minutes): above the worst skew of a long rollout step
    stage: str = "grpo_mm"  # recorded in final/revisual.json
    wandb_project: str = ""  # log to Weights & Biases when set and wandb imports


def balance_over_ranks(costs: list[int], world: int) -> list[list[int]]:
    """Indices of `costs` split over ranks, longest first onto the least loaded rank (deterministic)."""
    load, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += costs[i]
    return out


# ----------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Sample:
    """One sampled completion and everything the update and the logs need about it."""

    rec: int  # index of the prompt's record
    completion: list[int]  # token ids, ending with <|im_end|> unless truncated
    text: str
    truncated: bool
    reward: float = 0.0
    acc: float = 0.0
    format: float = 0.0
    len_reward: float = 0.0
    advantage: float = 0.0
    times_drawn: int = 0
    prompt_len: int = 0  # tokens of the prompt (the packer sizes micro-batches by prompt + completion)


class PromptSampler:
    """Prompts in a fresh permutation per epoch, a deterministic function of (seed, epoch); its state is
    (epoch, position), saved in checkpoints so a resumed run draws the same prompts it would have."""

    def __init__(self, n_records: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n_records, seed, epoch, pos

    def _perm(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def take(self, k: int) -> list[int]:
        out, perm = [], self._perm()
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos, perm = self.epoch + 1, 0, None
                perm = self._perm()
            take = min(k - len(out), self.n - self.pos)
            out += perm[self.pos : self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


def rollout(
    model, processor, prompts: list[D.EncodedPrompt], rec_ids: list[int], cfg: GRPOConfig, seed: int
) -> list[Sample]:
    """n completions per prompt: engine.py's continuous batching by default (HF `generate`'s tokens under greedy
    decoding and its distribution; one prefill per group; `rollout_slots` decode slots), sampling.py's decode loop
    per micro-batch with `rollout_engine=False`, HF `generate` itself with `cfg.hf_generate`."""
    tok = processor.tokenizer
    gc = S.generation_config(tok, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    gc.min_new_tokens = cfg.min_new_tokens or None
    eos = set(gc.eos_token_id)
    out: list[Sample] = []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The engine takes all of the rank's prompts at once; the old loop (and HF) one micro-batch per call.
        use_engine = cfg.rollout_engine and not cfg.hf_generate
        step = max(1, len(prompts)) if use_engine else cfg.rollout_micro_batch
        for s in range(0, len(prompts), step):
            chunk = prompts[s : s + step]
            ids = [r for r in rec_ids[s : s + step] for _ in range(cfg.group_size)]
            # row-aligned with ids
            prompt_lens = [len(p.input_ids) for p in chunk for _ in range(cfg.group_size)]
            batch = D.collate_prompts(chunk, tok.pad_token_id, model.config.image_token_id)
            # The engine takes a rank's whole step (512 prompts at paper scale: tens of GB of pixel patches at
            # max_pixels): their pixels stay on the host and each prefill moves its own rows' images.
            batch = {k: v if use_engine and k == "pixel_values" else v.to(device) for k, v in batch.items()}
            # Each prompt prefilled once, its KV cache copied to its n samples (HF's loop with --hf_generate: each
            # prompt expanded n times before the prefill); rows come back prompt-major.
            kw = dict(generation_config=gc, num_return_sequences=cfg.group_size)
            if use_engine:
                slots = cfg.rollout_slots or cfg.rollout_micro_batch * cfg.group_size
                seqs = E.generate(model, **batch, **kw, slots=slots)
            else:
                seqs = S.generate(model, **batch, **kw, use_hf=cfg.hf_generate)
            new = seqs[:, batch["input_ids"].shape[1] :].tolist()
            for rec, plen, gen in zip(ids, prompt_lens, new):
                completion, truncated = S.split_completion(gen, eos)
                text = tok.decode(completion, skip_special_tokens=True)
                out.append(Sample(rec, completion, text, truncated, prompt_len=plen))
    return out


# ----------------------------------------------------------------------------------------------------------
# The update


def plan_updates(
    samples: list[Sample], cfg: GRPOConfig, world: int, generator: torch.Generator
) -> list[tuple[list[list[list[int]]], int]]:
    """Kept sequences -> per update: (per rank, a list of micro-batches of sample indices; global token count).

    A sequence drawn k times appears k times. Each mini-batch is spread over ranks balanced by tokens, and
    every rank gets the same number of micro-batches (empty ones are padded by the caller with weight 0).

    `micro_batch_tokens` > 0: each mini-batch is packed instead (data.packed_micro_batches: first-fit decreasing
    into micro-batches of at most that many prompt + completion tokens, dealt to ranks balanced by tokens); the
    mini-batches, their token counts and so the loss are the same, only the grouping changes."""
    kept = [i for i, s in enumerate(samples) for _ in range(s.times_drawn)]
    kept = [kept[j] for j in torch.randperm(len(kept), generator=generator).tolist()]
    plans = []
    for s in range(0, len(kept), cfg.mini_batch):
        mb = kept[s : s + cfg.mini_batch]
        if cfg.micro_batch_tokens > 0:
            lengths = [samples[i].prompt_len + len(samples[i].completion) for i in mb]
            # packed over positions in mb (a sequence drawn twice is two items), then mapped to sample indices
            packed = D.packed_micro_batches(list(range(len(mb))), lengths, cfg.micro_batch_tokens, world)
            n_micro = max(len(p) for p in packed)
            micro = [[[mb[j] for j in b] for b in p] + [[]] * (n_micro - len(p)) for p in packed]
            plans.append((micro, sum(len(samples[i].completion) for i in mb)))
            continue
        lens = [len(samples[i].completion) for i in mb]
        per_rank = [[mb[j] for j in part] for part in balance_over_ranks(lens, world)]
        n_micro = max(math.ceil(len(p) / cfg.micro_batch) for p in per_rank)
        m = cfg.micro_batch
        micro = [[p[k * m : (k + 1) * m] for k in range(n_micro)] for p in per_rank]
        plans.append((micro, sum(len(samples[i].completion) for i in mb)))
    return plans


def sequence_batch(
    samples: list[Sample],
    idx: list[int],
    encoded: dict[int, D.EncodedPrompt],
    processor,
    image_token_id: int,
    device,
) -> dict:
    prompts, completions = [encoded[samples[i].rec] for i in idx], [samples[i].completion for i in idx]
    b = D.collate_sequences(prompts, completions, processor.tokenizer.pad_token_id, image_token_id)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


POLICY_INPUTS = "input_ids attention_mask target_mask pixel_values image_grid_thw mm_token_type_ids".split()


def forward_logprobs(policy, b: dict, temperature: float, with_entropy: bool = False):
    """Per-token log-probs (and entropies) of the batch's completion tokens, fp32 from temperature-scaled logits.
    A bf16 run without FSDP's mixed precision (one process, or DDP) computes under bf16 autocast; the weights
    stay fp32 and token_logprobs keeps the logits fp32."""
    bf16 = getattr(policy_core(policy), "autocast_bf16", False)
    with torch.autocast(b["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        return policy(*(b[k] for k in POLICY_INPUTS), temperature=temperature, with_entropy=with_entropy)


def setup_policy(cfg: GRPOConfig, d: C.Dist):
    """Load the starting model; shard (FSDP2) or wrap (DDP) it when distributed. Returns
    (policy to train, its Policy core, processor, prompt, placement, reference Policy or None).

    A checkpoint directory is read by rank 0 alone; the other ranks build on the meta device and receive the
    weights into their shards (FSDP) or replicas (DDP), so a node holds one full host copy at a time. The
    reference model (KL on) is loaded only after the policy is sharded, for the same reason."""
    fsdp = d.on and cfg.distributed == "fsdp"
    from_rank0 = d.on and os.path.isdir(cfg.model)
    use_bf16 = C.resolve_bf16(cfg.bf16, d)

    def load_and_place(trainable: bool) -> P.Policy:
        hf = M.load_weights(cfg.model, seed=cfg.seed, on_meta=from_rank0 and not d.main)
        if trainable:
            if cfg.freeze_vision:
                M.freeze_vision(hf)
            M.set_gradient_checkpointing(hf, cfg.gradient_checkpointing)
        policy = P.Policy(hf)
        if not trainable:
            policy.eval().requires_grad_(False)
        # A group's n sequences share one prompt: its image through the vision tower once and its prompt
        # through the decoder once (model.py; equal to the plain forward up to summation order).
        policy.dedupe_images = policy.share_prefix = True
        # Token-budget micro-batches run as packed rows (policy.Policy.pack), which replace the shared prefix.
        policy.pack = cfg.micro_batch_tokens > 0
        if fsdp:
            SH.shard(policy, param_dtype=torch.bfloat16 if use_bf16 else None, from_rank0=from_rank0)
        else:
            SH.place_replica(policy, d.device, from_rank0)
            # bf16 without FSDP's mixed precision (one process, or DDP): autocast; weights stay fp32.
            policy.autocast_bf16 = use_bf16
            policy.always_run_vision = d.on  # DDP: every rank uses the same parameters in every step
        return policy

    core = load_and_place(trainable=True)
    processor = M.load_processor(cfg.model)
    prompt, placement = M.recorded_prompt(cfg.model, cfg.prompt, cfg.placement)
    # the stage's starting model, frozen; only loaded when the KL term is on
    ref = load_and_place(trainable=False) if cfg.kl_coef > 0 else None
    policy = core
    if d.on and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        policy = DDP(core)
    return policy, core, processor, prompt, placement, ref


def fitting_prompts(
    records: list[D.Record], processor, prompt: str, placement: str, max_prompt_len: int, d: C.Dist
) -> list[D.Record]:
    """The records whose prompt fits `max_prompt_len`, decided once at start (as EasyR1's filter_overlong_prompts)
    rather than by an error in the middle of a step. Rank 0 measures every prompt from its text and image
    headers (a missing or unreadable image is an error here, naming its record); every rank takes its answer."""
    keep, error = None, None
    if d.main:
        try:
            lens = [D.prompt_length(r, processor, prompt, placement) for r in records]
            keep = [i for i, n in enumerate(lens) if n <= max_prompt_len]
        except D.DataError as e:
            error = str(e)
    keep, error = C.broadcast_object((keep, error), d)
    if error:
        raise D.DataError(error)
    if not keep:
        raise D.DataError(f"no prompt of {len(records)} fits max_prompt_len {max_prompt_len}")
    if d.main and len(keep) < len(records):
        dropped = len(records) - len(keep)
        print(f"dropped {dropped} of {len(records)} prompts over max_prompt_len {max_prompt_len}", flush=True)
    return [records[i] for i in keep]


def validate_config(cfg: GRPOConfig, world: int) -> None:
    """Refuse, with one line naming the field, what would otherwise fail mid-run or train silently wrong."""
    if not cfg.data:
        raise C.ConfigError("--data is required (JSONL records with an 'answer' field)")
    if cfg.group_size < 2:  # the group std is over group_size - 1: one sample gives NaN advantages
        raise C.ConfigError(
            f"--group_size must be >= 2 (group advantages need two samples), got {cfg.group_size}"
        )
    counts = ("max_steps", "rollout_batch", "rollout_micro_batch", "mini_batch", "micro_batch", "ppo_epochs")
    for name in counts + ("max_new_tokens", "max_prompt_len", "max_bad_steps", "grade_workers"):
        if getattr(cfg, name) < 1:
            raise C.ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.rollout_slots < 0:
        raise C.ConfigError(
            f"--rollout_slots must be >= 0 (0: rollout_micro_batch x group_size), got {cfg.rollout_slots}"
        )
    if cfg.micro_batch_tokens < 0:
        raise C.ConfigError(f"--micro_batch_tokens must be >= 0 (0 = off), got {cfg.micro_batch_tokens}")
    lo, hi = cfg.min_pixels, cfg.max_pixels
    if lo < 0 or hi < 0 or (lo and hi and lo > hi):
        raise C.ConfigError(
            f"--min_pixels / --max_pixels: 0 (the checkpoint's) or 0 < min <= max, got "
            f"{cfg.min_pixels}, {cfg.max_pixels}"
        )
    if cfg.rollout_batch % world:
        raise C.ConfigError(f"--rollout_batch {cfg.rollout_batch} does not divide over {world} ranks")
    C.check_choice("pad_mode", cfg.pad_mode, ("paper", "released", "filter", "off"))
    C.check_choice("truncation", cfg.truncation, ("keep", "mask"))
    C.check_choice("distributed", cfg.distributed, ("fsdp", "ddp"))
    C.check_choice("bf16", str(cfg.bf16).lower(), ("auto", "true", "false"))
    C.check_choice("placement", cfg.placement, ("", *D.PLACEMENTS))
    if not cfg.temperature > 0 or not 0 < cfg.top_p <= 1:
        raise C.ConfigError(
            f"--temperature must be > 0 and --top_p in (0, 1]; got {cfg.temperature}, {cfg.top_p}"
        )
    bad_tau = min(cfg.pad_tau_start, cfg.pad_tau_end) <= 0
    if not 0 < cfg.pad_rho <= 1 or not 0 <= cfg.pad_t_low <= cfg.pad_t_high or bad_tau:
        raise C.ConfigError("PAD needs 0 < pad_rho <= 1, 0 <= pad_t_low <= pad_t_high and positive pad_tau_*")
    if cfg.kl_coef < 0 or cfg.clip_low < 0 or cfg.clip_high < 0 or (cfg.dual_clip and cfg.dual_clip <= 1):
        raise C.ConfigError("--kl_coef, --clip_low, --clip_high must be >= 0 and --dual_clip 0 or > 1")


def train(cfg: GRPOConfig) -> str:
    """Run the GRPO stage; returns the path of the final model."""
    validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    d = C.init_distributed(timeout_min=cfg.dist_timeout_min)
    C.seed_everything(cfg.seed * 1000 + d.rank)
    memory = C.PhaseMemory(d.device)  # each phase's peak, logged (memory.py models them)
    os.makedirs(cfg.out_dir, exist_ok=True)
    records = D.load_records(cfg.data, image_dir=cfg.image_dir, check_images=False)  # checked by rank 0 below
    policy, core, processor, prompt, placement, ref = setup_policy(cfg, d)
    M.set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    records = fitting_prompts(records, processor, prompt, placement, cfg.max_prompt_len, d)
    hf = core.model
    params = [p for p in policy.parameters() if p.requires_grad]
    # constant lr
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    reward_fields = ("w_acc", "w_fmt", "w_len", "len_budget", "len_alpha", "len_delta", "grade_workers")
    rcfg = R.RewardConfig(**{f: getattr(cfg, f) for f in reward_fields})
    sampler, start, bad = PromptSampler(len(records), cfg.seed), 0, {"streak": 0, "total": 0}
    ckpt = C.resolve_resume(cfg.resume, cfg.out_dir, d)
    if ckpt:
        state = C.load_checkpoint(ckpt, policy, opt, d)
        start, sampler = state["step"], PromptSampler(len(records), cfg.seed, **state["sampler"])
        bad = state.get("bad", bad)
        if d.main:
            print(f"[{cfg.stage}] resumed from {ckpt} (step {start})", flush=True)
    metrics = C.JsonlLog(os.path.join(cfg.out_dir, "metrics.jsonl"), d.main)
    rollouts_log = C.JsonlLog(os.path.join(cfg.out_dir, "rollouts.jsonl"), d.main)
    metrics.truncate_after(start)
    rollouts_log.truncate_after(start)
    eval_records = []
    if cfg.eval_data:
        eval_records = D.load_records(
            cfg.eval_data, limit=cfg.eval_limit, image_dir=cfg.image_dir, check_images=False
        )
        eval_records = fitting_prompts(eval_records, processor, prompt, placement, cfg.max_prompt_len, d)
    wandb = _wandb(cfg, d)
    t_start = time.time()
    bar = tqdm(
        range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not d.main, desc=cfg.stage
    )
    for t in bar:  # t counts rollout steps from 0; the logs call this step t + 1
        step, t0 = t + 1, time.time()
        # 1. rollouts on this rank's share of the step's prompts
        recs = sampler.take(cfg.rollout_batch)
        mine = recs[d.rank :: d.world]
        encoded = {
            r: D.encode_prompt(records[r], processor, prompt, placement, cfg.max_prompt_len) for r in mine
        }
        memory.reset()
        with SH.gathered_for_generation(core) as gen_model:
            seed = rollout_seed(cfg.seed, step, d.rank)
            local = rollout(gen_model, processor, [encoded[r] for r in mine], mine, cfg, seed=seed)
        # 2. rewards, graded where they were sampled
        texts, lens = [s.text for s in local], [len(s.completion) for s in local]
        answers, choices = [records[s.rec].answer for s in local], [records[s.rec].choices for s in local]
        parts = R.score_completions(texts, answers, choices, lens, rcfg)
        for s, p in zip(local, parts):
            s.reward, s.acc, s.format, s.len_reward = p["reward"], p["acc"], p["format"], p["len_reward"]
        samples = [s for part in C.all_gather_objects(local, d) for s in part]  # rank-major, groups of n
        # 3. group advantages; 4. PAD on the global batch (the same generator on every rank: the same choice)
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64).view(-1, cfg.group_size)
        adv = grpo.group_advantages(rewards).flatten()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        tau = grpo.pad_tau(t, cfg.max_steps, cfg.pad_tau_start, cfg.pad_tau_end)
        eligible = torch.tensor([not s.truncated for s in samples]) if cfg.truncation == "mask" else None
        drawn, size_e, _ = grpo.pad_select(
            adv, cfg.pad_mode, cfg.pad_t_low, cfg.pad_t_high, tau, cfg.pad_rho, gen, eligible
        )
        for s, a, k in zip(samples, adv.tolist(), drawn.tolist()):
            s.advantage, s.times_drawn = a, k
        rollout_s, mem_rollout = time.time() - t0, memory.peak_mb()
        # 5-6. updates on the kept sequences only
        memory.reset()
        t1 = time.time()
        beta = grpo.entropy_beta(
            t, cfg.entropy_beta0, cfg.entropy_beta_min, cfg.entropy_decay, cfg.entropy_warmup
        )
        args = (policy, ref, samples, records, encoded, processor, prompt, placement, cfg, d)
        stats = update(*args, beta, gen, params, opt, bad)
        train_s, mem_update = time.time() - t1, memory.peak_mb()
        # 7. logs
        acc_groups = torch.tensor([s.acc for s in samples]).view(-1, cfg.group_size)
        row = {
            "step": step,
            "updates": stats["updates"],
            "skipped_updates": stats["skipped_updates"],
            "bad_steps": bad["total"],
            "loss": stats["loss"],
            "lr": cfg.lr,
            "elapsed_s": round(time.time() - t_start, 3),
            "reward": _mean(s.reward for s in samples),
            "acc": _mean(s.acc for s in samples),
            "format": _mean(s.format for s in samples),
            "len_reward": _mean(s.len_reward for s in samples),
            "resp_len": _mean(len(s.completion) for s in samples),
            "truncated_frac": _mean(s.truncated for s in samples),
            "zero_adv_frac": float((adv.abs() < 1e-6).double().mean()),
            "uniform_acc_frac": float((acc_groups.max(1).values == acc_groups.min(1).values).double().mean()),
            "pad_effective": size_e,
            "pad_kept": int((drawn > 0).sum()),
            "pad_tau": tau,
            "kept_token_frac": _kept_token_frac(samples),
            "kl": stats["kl"],
            "entropy": stats["entropy"],
            "entropy_beta": beta,
            "clip_frac": stats["clip_frac"],
            "grad_norm": stats["grad_norm"],
            "rollout_s": round(rollout_s, 3),
            "train_s": round(train_s, 3),
            "mem_rollout_mb": mem_rollout,
            "mem_update_mb": mem_update,
        }
        if eval_records and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            memory.reset()
            row.update(validate(core, processor, eval_records, prompt, placement, cfg, d))
            row["mem_validation_mb"] = memory.peak_mb()
        metrics.write(row)
        rollouts_log.write([_rollout_row(step, records[s.rec].id, s) for s in samples])
        if wandb:
            wandb.log(row, step=step)
        post = dict(reward=f"{row['reward']:.3f}", acc=f"{row['acc']:.2f}", kept=row["pad_kept"])
        bar.set_postfix(**post, roll_s=f"{rollout_s:.1f}", train_s=f"{train_s:.1f}")
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
            C.save_checkpoint(cfg.out_dir, step, policy, opt, {"sampler": sampler.state(), "bad": bad}, d)
    final = os.path.join(cfg.out_dir, "final")
    state_dict = SH.full_state_dict(core)
    if d.main:
        meta = {"prompt": prompt, "placement": placement, "stage": cfg.stage, "config": asdict(cfg)}
        M.save_model(hf, processor, final, meta, state_dict=state_dict)
    C.barrier(d)
    return final


def update(
    policy,
    ref,
    samples: list[Sample],
    records,
    encoded: dict,
    processor,
    prompt: str,
    placement: str,
    cfg: GRPOConfig,
    d: C.Dist,
    beta: float,
    gen: torch.Generator,
    params,
    opt,
    bad: dict | None = None,
) -> dict:
    """Steps 5-6: old and reference log-probs, then ceil(k'/mini_batch) updates per ppo epoch. Only kept
    sequences go through a forward; a rank short of micro-batches repeats one with weight 0 so that every
    rank runs the same collectives (PITFALLS)."""
    bad = {"streak": 0, "total": 0} if bad is None else bad  # non-finite steps: in a row, in all (updated)
    plans = plan_updates(samples, cfg, d.world, gen)
    if not plans:  # E empty: nothing to train on this step (logged as updates = 0)
        return dict(updates=0, skipped_updates=0, loss=0.0, kl=0.0, entropy=0.0, clip_frac=0.0, grad_norm=0.0)
    image_token_id = policy_core(policy).model.config.image_token_id
    # One sequence per update that a rank with too few micro-batches repeats with weight 0.
    fillers = [next(i for rank_micro in micro for mb in rank_micro for i in mb) for micro, _ in plans]
    needed = {samples[i].rec for micro, _ in plans for mb in micro[d.rank] for i in mb}
    for r in needed | {samples[i].rec for i in fillers}:
        if r not in encoded:  # prompts sampled on another rank: encode them here
            encoded[r] = D.encode_prompt(records[r], processor, prompt, placement, cfg.max_prompt_len)

    def batches(u):
        for idx in plans[u][0][d.rank]:
            weight = 1.0 if idx else 0.0
            idx = idx or [fillers[u]]
            yield idx, weight, sequence_batch(samples, idx, encoded, processor, image_token_id, d.device)

    multi = len(plans) * cfg.ppo_epochs > 1
    old, refs = {}, {}
    if multi or ref is not None:
        with torch.no_grad():
            for u in range(len(plans)):
                for k, (_, _, b) in enumerate(batches(u)):
                    if multi:
                        old[u, k] = forward_logprobs(policy, b, cfg.temperature)[0]
                    if ref is not None:
                        refs[u, k] = forward_logprobs(ref, b, cfg.temperature)[0]
    sums = torch.zeros(5, dtype=torch.float64)  # policy loss, kl, entropy, clipped tokens, tokens
    norms, skipped = [], 0
    clip = (cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.logratio_clamp)
    policy.train()
    for _ in range(cfg.ppo_epochs):
        for u, (_, global_tokens) in enumerate(plans):
            part = torch.zeros(5, dtype=torch.float64)
            for k, (idx, weight, b) in enumerate(batches(u)):
                logp, ent = forward_logprobs(policy, b, cfg.temperature, with_entropy=True)
                mask = b["target_mask"].float()
                adv = torch.tensor(
                    [samples[i].advantage for i in idx], dtype=torch.float32, device=logp.device
                )
                pg, clipped = grpo.policy_loss(logp, old.get((u, k), logp.detach()), adv, mask, *clip)
                if ref is not None:
                    kl = grpo.kl_k3(logp, refs[u, k], cfg.kl_clamp) * mask
                else:
                    kl = torch.zeros_like(pg)
                per_token = pg + cfg.kl_coef * kl - beta * ent * mask
                # Token mean over the mini-batch's GLOBAL token count; DDP/FSDP average gradients over ranks,
                # so x world turns that average back into the sum over ranks.
                loss = per_token.sum() * (weight * d.world / global_tokens)
                loss.backward()
                with torch.no_grad():
                    vals = [pg.sum(), kl.sum(), (ent * mask).sum(), clipped.sum(), mask.sum()]
                    part += weight * torch.tensor([v.item() for v in vals], dtype=torch.float64)
            # a parameter no micro-batch reached (the vision tower on a text-only mini-batch)
            for p in params:
                if p.grad is None:  # steps as it does on several ranks, where the dummy image gives it zeros
                    p.grad = torch.zeros_like(p)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            # The norm is global (FSDP: over every shard; DDP: of the averaged gradients), so every rank takes
            # the same decision. A NaN/inf gradient never reaches AdamW: clip_grad_norm_ would have scaled every
            # gradient by NaN, and one step would write NaN into every weight and both moments for good.
            if math.isfinite(norm):
                opt.step()
                sums += part
                norms.append(norm)
                bad["streak"] = 0
            else:
                skipped += 1
                bad["streak"] += 1
                bad["total"] += 1
                print(
                    f"[{cfg.stage} rank {d.rank}] non-finite gradient (norm {norm}): update skipped "
                    f"({bad['streak']} in a row)",
                    flush=True,
                )
                if bad["streak"] >= cfg.max_bad_steps:
                    raise C.NonFiniteError(
                        f"{bad['streak']} non-finite optimizer steps in a row (max_bad_steps "
                        f"{cfg.max_bad_steps}); lower --lr or check the data"
                    )
            opt.zero_grad(set_to_none=True)  # gradients freed now, not kept through the next rollout
    pg_sum, kl_sum, ent_sum, clipped, tokens = C.all_reduce_sum(sums, d).tolist()
    tokens = max(tokens, 1.0)
    mean_loss = (pg_sum + cfg.kl_coef * kl_sum - beta * ent_sum) / tokens
    out = dict(updates=len(norms), skipped_updates=skipped, loss=mean_loss, kl=kl_sum / tokens)
    return dict(out, entropy=ent_sum / tokens, clip_frac=clipped / tokens, grad_norm=_mean(norms))


def policy_core(policy) -> P.Policy:
    return policy.module if hasattr(policy, "module") else policy


def validate(
    core: P.Policy, processor, records, prompt: str, placement: str, cfg: GRPOConfig, d: C.Dist
) -> dict:
    """Greedy accuracy on the held-out split through eval.py's scoring (in-loop validation)."""
    import eval as evaluation

    # Greedy, one sample per prompt, in generate calls as large as a rollout call (rollout_micro_batch prompts
    # x group_size rows): validation needs no more KV-cache memory than the rollouts already do.
    kw = dict(max_new_tokens=cfg.max_new_tokens, dist=d, batch_size=cfg.rollout_micro_batch * cfg.group_size)
    res = evaluation.evaluate_records(core, processor, records, prompt=prompt, placement=placement, **kw)
    return dict(
        val_acc=res["accuracy"], val_format=res.get("format", 0.0), val_resp_len=res.get("resp_len", 0.0)
    )


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """Per-rank sampling seed from (seed, step, rank): resumed runs sample what they would have."""
    return (seed * 1_000_003 + step * 1_009 + rank) % 2**31


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0


def _rollout_row(step: int, prompt_id: str, s: Sample) -> dict:
    """One rollouts.jsonl line (viewer.py reads them)."""
    row = {"step": step, "prompt_id": prompt_id, "completion": s.text, "num_tokens": len(s.completion)}
    row.update(
        {k: getattr(s, k) for k in ("truncated", "reward", "acc", "format", "len_reward", "advantage")}
    )
    return dict(row, kept=s.times_drawn > 0, times_drawn=s.times_drawn)


def _kept_token_frac(samples: list[Sample]) -> float:
    """Share of the step's completion tokens that the update trains on (PAD/filter skip the rest)."""
    total = sum(len(s.completion) for s in samples)
    return sum(len(s.completion) for s in samples if s.times_drawn) / max(1, total)


def _wandb(cfg, d: C.Dist):
    if not (cfg.wandb_project and d.main):
        return None
    try:
        import wandb
    except ImportError:
        print("wandb_project is set but wandb is not installed; logging to metrics.jsonl only")
        return None
    wandb.init(project=cfg.wandb_project, config=asdict(cfg))
    return wandb


if __name__ == "__main__":
    C.main_guard(train, GRPOConfig)
