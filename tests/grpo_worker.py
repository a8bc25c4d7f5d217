"""Worker for tests/test_grpo_dist.py: one process of a `torchrun --nproc_per_node N` job, or a plain single process.

  python tests/grpo_worker.py update   --synth DIR --out DIR [--distributed fsdp|ddp]
      For each case in CASES: build the tiny model the way grpo_mm.train does (setup_policy: FSDP2 shard or
      DDP when distributed), build fixed rollouts (`build_samples`: Samples with completion ids, group
      advantages and PAD picks from a fixed generator), run grpo_mm.update once, then write
      OUT/CASE.pt (sharding.full_state_dict, rank 0) and OUT/CASE.json (the update's stats and the plan).
  python tests/grpo_worker.py generate --synth DIR --out DIR
      Count torch.distributed collectives while entering sharding.gathered_for_generation, during
      grpo_mm.rollout inside it, and while leaving it, on the FSDP2-sharded model; rank r writes
      OUT/generate_rank{r}.json.

Nothing here is pytest: the test launches it and reads what it writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import common as C  # noqa: E402
import data as D  # noqa: E402
import grpo  # noqa: E402
import grpo_mm as G  # noqa: E402
import model as M  # noqa: E402
import policy as P  # noqa: E402
import sampling as S  # noqa: E402
import sharding as SH  # noqa: E402

N = 4  # completions per prompt
# completion lengths (with the closing <|im_end|>) of the groups' samples
MM_LEN, TEXT_LENS = 40, (6, 7, 8, 9)
# Rewards per group of N: the multimodal group has one outlier (|A| = 1.5 for it, 0.5 for the others); the
# two text groups split 2/2 (|A| = 0.866 for all). With t_low = 0.6, E = {mm outlier} + 8 text samples;
# rho = 0.4 of 12 caps PAD at 5 draws, and tau = 0.05 makes the mm outlier the first draw, so PAD keeps the
# long multimodal sample and four short text samples and drops seven: three by E (|A| = 0.5), four by rho.
GROUP_REWARDS = [[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
PAD = dict(mode="paper", t_low=0.6, t_high=float("inf"), tau=0.05, rho=0.4)
PAD_SEED = 1234

# name -> GRPOConfig overrides and the entropy coefficient of the update
CASES = {
    # one update over all kept sequences; micro_batch 2 gives rank 1 (four text samples) two micro-batches and
    # rank 0 (the multimodal one) one, padded with a zero-weight filler
    "one_update": (dict(mini_batch=64, micro_batch=2, ppo_epochs=1), 0.01),
    # ceil(5 / 3) = 2 updates: the second mini-batch is text-only (on both ranks, and on the single process)
    "two_updates": (dict(mini_batch=3, micro_batch=1, ppo_epochs=1), 0.0),
    # 2 updates x 2 ppo epochs, old log-probs from the pre-update policy, k3 KL against a
    # reference model (sharded / replicated like the policy)
    "two_updates_two_epochs_kl": (dict(mini_batch=3, micro_batch=1, ppo_epochs=2, kl_coef=0.05), 0.01),
}


def load_case_records(synth_dir: str) -> list[D.Record]:
    """records[0] has an image (mm_train), records[1:] are text-only (text_train)."""
    mm = D.load_records(os.path.join(synth_dir, "mm_train.jsonl"), limit=1)
    text = D.load_records(os.path.join(synth_dir, "text_train.jsonl"), limit=2)
    assert mm[0].images and not any(r.images for r in text)
    return mm + text


def build_samples(tokenizer) -> tuple[list[G.Sample], torch.Generator, list[int]]:
    """The fixed rollouts: groups (rec 0: multimodal, rec 1, 2: text) of N samples with random completions
    (ids of ordinary BPE tokens, closed by <|im_end|>), rewards GROUP_REWARDS, group advantages, and
    times_drawn from PAD with a fixed generator. Returns (samples, the generator after PAD (update() goes on
    with it, as train() does), the PAD picks)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # ids below are plain BPE tokens
    n_plain = min(tokenizer.convert_tokens_to_ids(t) for t in M.SPECIAL_TOKENS)
    g = torch.Generator().manual_seed(7)
    samples = []
    for rec, rewards in enumerate(GROUP_REWARDS):
        for j, r in enumerate(rewards):
            length = (MM_LEN if j == 0 else TEXT_LENS[j]) if rec == 0 else TEXT_LENS[j]
            ids = torch.randint(0, n_plain, (length - 1,), generator=g).tolist() + [im_end]
            samples.append(G.Sample(rec=rec, completion=ids, text="", truncated=False, reward=r))
    rewards = torch.tensor(GROUP_REWARDS, dtype=torch.float64)
    adv = grpo.group_advantages(rewards).flatten()
    gen = torch.Generator().manual_seed(PAD_SEED)
    drawn, _, picks = grpo.pad_select(
        adv, PAD["mode"], PAD["t_low"], PAD["t_high"], PAD["tau"], PAD["rho"], gen
    )
    for s, a, k in zip(samples, adv.tolist(), drawn.tolist()):
        s.advantage, s.times_drawn = a, k
    return samples, gen, picks.tolist()


def case_config(name: str, distributed: str) -> G.GRPOConfig:
    overrides, _ = CASES[name]
    pad = dict(pad_mode=PAD["mode"], pad_t_low=PAD["t_low"], pad_rho=PAD["rho"])
    sizes = dict(group_size=N, rollout_batch=len(GROUP_REWARDS))
    return G.GRPOConfig(model="tiny", seed=0, **sizes, **pad, distributed=distributed, **overrides)


def run_update(args, d: C.Dist) -> None:
    for name, (_, beta) in CASES.items():
        cfg = case_config(name, args.distributed)
        policy, core, processor, prompt, placement, ref = G.setup_policy(cfg, d)
        records = load_case_records(args.synth)
        samples, gen, picks = build_samples(processor.tokenizer)
        for s in samples:  # as rollout() records it (only a token-budget plan reads it)
            s.prompt_len = D.prompt_length(records[s.rec], processor, prompt, placement)
        plan = G.plan_updates(samples, cfg, d.world, torch.Generator().set_state(gen.get_state()))
        mine = list(range(len(records)))[d.rank :: d.world]
        encoded = {
            r: D.encode_prompt(records[r], processor, prompt, placement, cfg.max_prompt_len) for r in mine
        }
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        if name == next(iter(CASES)):
            initial = SH.full_state_dict(core)
            if d.main:
                torch.save(initial, os.path.join(args.out, "initial.pt"))
        context = (records, encoded, processor, prompt, placement)
        stats = G.update(policy, ref, samples, *context, cfg, d, beta, gen, params, opt)
        state = SH.full_state_dict(core)
        if d.main:
            torch.save(state, os.path.join(args.out, f"{name}.pt"))
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                result = dict(
                    stats=stats, plan=plan, picks=picks, world=d.world, wrapped=type(policy).__name__
                )
                json.dump(result, f)
        C.barrier(d)
        del policy, core, ref, opt


# ----------------------------------------------------------------------------------------------------------
# Collective counter


COLLECTIVES = (
    "all_gather_into_tensor all_gather_single all_gather all_gather_object all_gather_coalesced _all_gather_base "
    "all_reduce all_reduce_coalesced reduce_scatter_tensor reduce_scatter_single reduce_scatter _reduce_scatter_base "
    "broadcast broadcast_object_list reduce gather scatter all_to_all_single all_to_all barrier send recv"
).split()


class CollectiveCounter:
    """Counts collectives per phase in two independent ways:
    - `python`: the torch.distributed functions, patched where FSDP2 and transformers look them up: FSDP2's
      _fsdp_collectives.py calls `dist.all_gather_single` / `dist.reduce_scatter_single` / `dist.all_reduce`
      as attributes of the module `torch.distributed` at call time (and c10d's own functions call each other
      through `torch.distributed.distributed_c10d`), so both modules' attributes are replaced;
    - `dispatch`: every c10d / _c10d_functional op that reaches the dispatcher (a TorchDispatchMode), which
      also sees collectives issued from C++ or through functional collectives (DTensor redistribution)."""

    def __init__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        from torch.utils._python_dispatch import TorchDispatchMode

        self.phase = "none"
        self.python: Counter = Counter()
        self.dispatch: Counter = Counter()
        self.names: dict[str, Counter] = {}
        self._saved = []
        counter = self
        for mod in (dist, c10d):
            for name in COLLECTIVES:
                fn = getattr(mod, name, None)
                if fn is None or getattr(fn, "_counted", False):
                    continue

                def wrapper(*a, __fn=fn, __name=name, **k):
                    counter.python[counter.phase] += 1
                    counter.names.setdefault(counter.phase, Counter())[__name] += 1
                    return __fn(*a, **k)

                wrapper._counted = True
                self._saved.append((mod, name, fn))
                setattr(mod, name, wrapper)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if "c10d" in func.namespace:
                    counter.dispatch[counter.phase] += 1
                    counter.names.setdefault(counter.phase, Counter())[str(func)] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)

    def total(self, phase: str) -> int:
        return self.python[phase] + self.dispatch[phase]


def run_generate(args, d: C.Dist) -> None:
    """Rank 0 samples from the multimodal prompt, rank 1 from a text one (different image/no-image patterns:
    any collective inside generate would either be counted or hang)."""
    cfg = G.GRPOConfig(
        model="tiny", seed=0, group_size=N, rollout_batch=2, max_new_tokens=12, rollout_micro_batch=1
    )
    policy, core, processor, prompt, placement, _ = G.setup_policy(cfg, d)
    assert SH._fsdp_modules(core), "the policy is not sharded"
    records = load_case_records(args.synth)
    mine = [d.rank % len(records)]
    encoded = [D.encode_prompt(records[r], processor, prompt, placement, cfg.max_prompt_len) for r in mine]
    b = D.collate_sequences(
        encoded,
        [[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]],
        processor.tokenizer.pad_token_id,
        core.model.config.image_token_id,
    )
    seed = G.rollout_seed(cfg.seed, 1, d.rank)
    with CollectiveCounter() as cc:
        cc.phase = "forward_before"  # control: a forward on the sharded model all-gathers
        with torch.no_grad():
            G.forward_logprobs(policy, b, cfg.temperature)
        cc.phase = "enter"
        ctx = SH.gathered_for_generation(core)
        gen_model = ctx.__enter__()
        cc.phase = "generate"
        samples = G.rollout(gen_model, processor, encoded, mine, cfg, seed=seed)
        # control: the same model and generation config with synced_gpus=True (what transformers turns on by
        # itself when the tower stays sharded) all-reduces once per token, and the counter must see it
        cc.phase = "generate_synced_control"
        gc = S.generation_config(processor.tokenizer, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        gc.max_new_tokens = 3
        batch = D.collate_prompts(encoded, processor.tokenizer.pad_token_id, core.model.config.image_token_id)
        with torch.no_grad():
            gen_model.generate(**batch, generation_config=gc, synced_gpus=True)
        cc.phase = "exit"
        ctx.__exit__(None, None, None)
        cc.phase = "forward_after"  # control: resharded again on exit, so a forward all-gathers again
        with torch.no_grad():
            G.forward_logprobs(policy, b, cfg.temperature)
        cc.phase = "none"
    # The same rollout on an unsharded copy of the model (same seed) must sample the same completions.
    plain, _ = M.load_model("tiny", seed=cfg.seed)
    with SH.gathered_for_generation(P.Policy(plain)) as m:
        reference = G.rollout(m, processor, encoded, mine, cfg, seed=seed)
    out = {
        "rank": d.rank,
        "python": dict(cc.python),
        "dispatch": dict(cc.dispatch),
        "names": {k: dict(v) for k, v in cc.names.items()},
        "completions": [s.completion for s in samples],
        "reference": [s.completion for s in reference],
        "has_image": bool(encoded[0].pixel_values is not None),
    }
    with open(os.path.join(args.out, f"generate_rank{d.rank}.json"), "w") as f:
        json.dump(out, f)
    C.barrier(d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["update", "generate"])
    ap.add_argument("--synth", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--distributed", default="fsdp", choices=["fsdp", "ddp"])
    ap.add_argument("--cases", default="", help="JSON {name: [GRPOConfig overrides, beta]} replacing CASES")
    args = ap.parse_args()
    if args.cases:
        CASES.clear()
        CASES.update({k: tuple(v) for k, v in json.loads(args.cases).items()})
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    d = C.init_distributed()
    try:
        (run_update if args.mode == "update" else run_generate)(args, d)
    finally:
        if d.on and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
