"""One GRPO step (rollout + reward + update) of ours against TRL's `GRPOTrainer`, on CPU, one process per side.

Both sides train the same tiny Qwen2.5-VL (`tiny`: the task BPE; `tiny-qwen`: the real 151k Qwen2 vocabulary;
the same random weights, seed 0) on the same prompts with images (the synthetic task's mm_train split, the
paper's system prompt), with the same n, batch and completion length, and do equal work: every completion is
exactly `max_new_tokens` long (min_new_tokens = max_new_tokens), no KL (beta 0, no reference model), one
optimizer update per rollout batch (mini-batch = micro-batch = the whole batch), our zero-advantage filter and PAD
off (`pad_mode="off"`: TRL has neither), the same temperature / top_p, and the same reward on both sides (the
share of ASCII letters in the decoded completion: cheap, and it varies within every group). The tokens generated
and trained on are printed for each side.

Each side runs in its own worker process that builds its model once and then runs one step per command; the
parent alternates the two sides (ours first on even pairs, TRL first on odd ones), so that the machine's load
drifts onto both alike, and reports the median over pairs of the per-pair ratio ours/TRL. One warm-up step per
side is left out. Both workers use the same number of threads (default 1: with two OpenMP threads on a busy
two-core machine a step can take 10x longer, and the noise swamps the comparison).

TRL lives in a virtual environment that this script creates on first use (`.venv-trl/` at the repository root,
ignored by git; or $TRL_VENV) that sees exactly the running environment's packages (`make_env`: the installed
torch and transformers are reused, also when this runs from a venv), and a constraint file pins both, so pip
never pulls another torch. TRL is never a dependency of the project.

Our side is grpo_mm's own code: `grpo_mm.rollout` (sampling.py's `generate`: our decode loop with an exact top-p
sampler that does not sort the 151k vocabulary, each prompt prefilled once per group), its advantages,
`pad_select` and update, on a `Policy` set up as `grpo_mm.setup_policy` does (`dedupe_images`, `share_prefix`:
a group's image through the vision tower once, its prompt through the decoder once).

    python bench/grpo_vs_trl.py                    # tiny and tiny-qwen: 4 prompts x 8, 64 tokens, 5 pairs
    python bench/grpo_vs_trl.py --quick            # 2 prompts x 4, 16 tokens, 5 pairs
Last line: `ratio ours/trl: tiny X, tiny-qwen Y` (goal: both <= 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_VERSION = "1.16.0"
TAG = "@@bench "  # protocol lines on a worker's stdout start with this; everything else is ignored


# ----------------------------------------------------------------------------------------------------------
# Shared by both sides


def letter_share(text: str) -> float:
    """The benchmark's reward: share of ASCII letters in a completion (varies within every group)."""
    return sum(c.isascii() and c.isalpha() for c in text) / max(1, len(text))


def load_prompts(data: str, k: int):
    """The first k records of `data` and their chat messages (the paper's prompt in the system turn)."""
    import data as D

    records = D.load_records(data)[:k]
    if len(records) < k or any(len(r.images) != 1 for r in records):
        raise SystemExit(f"{data}: need {k} records with one image each")
    return records, D.REASONING_PROMPT, "system"


def emit(obj: dict) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def next_command() -> str:
    line = sys.stdin.readline()
    return line.strip() if line else "quit"


# ----------------------------------------------------------------------------------------------------------
# Our side: the body of grpo_mm.train's loop for one step


def ours_worker(a) -> None:
    import torch

    import common as C
    import data as D
    import grpo
    import grpo_mm as G
    import model as M
    import policy as P
    import sharding as SH

    torch.set_num_threads(a.threads)
    records, prompt, placement = load_prompts(a.data, a.prompts)
    n_seq = a.prompts * a.group_size
    sizes = dict(rollout_batch=a.prompts, group_size=a.group_size, rollout_micro_batch=a.prompts)
    sizes.update(max_new_tokens=a.max_new_tokens, mini_batch=n_seq, micro_batch=n_seq)
    method = dict(ppo_epochs=1, kl_coef=0.0, pad_mode="off", temperature=a.temperature, top_p=a.top_p)
    cfg = G.GRPOConfig(model=a.model, **sizes, **method, lr=a.lr, entropy_warmup=10**9)
    cfg.min_new_tokens = a.max_new_tokens  # equal work: every completion exactly max_new_tokens long
    d = C.init_distributed("cpu")
    C.seed_everything(cfg.seed)
    hf, processor = M.load_model(a.model, seed=0)
    core = P.Policy(hf)
    core.share_prefix = core.dedupe_images = True  # as grpo_mm.setup_policy
    params = [p for p in core.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    ids0 = D.encode_prompt(records[0], processor, prompt, placement, cfg.max_prompt_len).input_ids
    emit({"ready": True, "side": "ours", "prompt_ids_0": ids0, "params": M.count_parameters(hf)})
    step = 0
    while next_command() == "step":
        step += 1
        t0 = time.perf_counter()
        recs = list(range(len(records)))
        encoded = {
            r: D.encode_prompt(records[r], processor, prompt, placement, cfg.max_prompt_len) for r in recs
        }
        with SH.gathered_for_generation(core) as gen_model:
            prompts = [encoded[r] for r in recs]
            seed = G.rollout_seed(cfg.seed, step, d.rank)
            samples = G.rollout(gen_model, processor, prompts, recs, cfg, seed=seed)
        t1 = time.perf_counter()
        for s in samples:
            s.reward = letter_share(s.text)
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64).view(-1, cfg.group_size)
        adv = grpo.group_advantages(rewards).flatten()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        drawn, _, _ = grpo.pad_select(adv, cfg.pad_mode, cfg.pad_t_low, cfg.pad_t_high, 1.0, cfg.pad_rho, gen)
        for s, adv_i, k in zip(samples, adv.tolist(), drawn.tolist()):
            s.advantage, s.times_drawn = adv_i, k
        context = (records, encoded, processor, prompt, placement)
        stats = G.update(core, None, samples, *context, cfg, d, 0.0, gen, params, opt)
        t2 = time.perf_counter()
        emit(
            {
                "seconds": t2 - t0,
                "rollout_s": t1 - t0,
                "update_s": t2 - t1,
                "updates": stats["updates"],
                "generated": sum(len(s.completion) for s in samples),
                "trained": sum(len(s.completion) * s.times_drawn for s in samples),
                "sequences": len(samples),
                "reward_std": float(rewards.std(-1).mean()),
            }
        )


# ----------------------------------------------------------------------------------------------------------
# TRL's side: GRPOTrainer, one trainer step per command


# TRL's settings that do not depend on the command line.
TRL_LOSS = dict(beta=0.0, num_iterations=1, epsilon=0.2, epsilon_high=0.25, mask_truncated_completions=False)
TRL_OPTIM = dict(lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0)
TRL_RUN = dict(max_steps=10**6, gradient_accumulation_steps=1, use_cpu=True, bf16=False, seed=0)
TRL_RUN.update(dataloader_num_workers=0, shuffle_dataset=False)
TRL_QUIET = dict(
    logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False
)


def trl_worker(a) -> None:
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback

    import data as D
    import model as M

    torch.set_num_threads(a.threads)
    records, prompt, placement = load_prompts(a.data, a.prompts)
    rows = []
    for r in records:
        msgs = D.build_messages(r, prompt, placement)
        # plain strings: TRL puts the image placeholder before the user text, as build_messages does
        for m in msgs:
            if isinstance(m["content"], list):
                m["content"] = next(c["text"] for c in m["content"] if c.get("type") == "text")
        rows.append({"prompt": msgs, "image": D.open_image(r.images[0], r.source)})
    dataset = datasets.Dataset.from_list(rows)
    hf, processor = M.load_model(a.model, seed=0)
    n_seq = a.prompts * a.group_size

    def reward(completions, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [letter_share(t) for t in texts]

    with tempfile.TemporaryDirectory() as out_dir:
        batch = dict(per_device_train_batch_size=n_seq, num_generations=a.group_size)
        lengths = dict(
            max_completion_length=a.max_new_tokens, generation_kwargs={"min_new_tokens": a.max_new_tokens}
        )
        sampling = dict(temperature=a.temperature, top_p=a.top_p, top_k=0, repetition_penalty=1.0)
        fixed = {**TRL_LOSS, **TRL_OPTIM, **TRL_RUN, **TRL_QUIET}
        args = trl.GRPOConfig(output_dir=out_dir, learning_rate=a.lr, **batch, **lengths, **sampling, **fixed)
        data = dict(train_dataset=dataset, processing_class=processor)
        trainer = trl.GRPOTrainer(model=hf, reward_funcs=reward, args=args, **data)
        # The prompt ids TRL generates from (checked against ours by the parent).
        prepared = trl.data_utils.prepare_multimodal_messages(rows[0]["prompt"], images=[rows[0]["image"]])
        ids0, _, _ = trainer._tokenize_prompts([prepared])
        ids0 = [int(t) for t in ids0[0]]
        counts, rollout_time = {}, [0.0]
        inner = trainer._generate_and_score_completions

        def timed_generate(inputs):
            t = time.perf_counter()
            out = inner(inputs)
            rollout_time[0] += time.perf_counter() - t
            mask = out["completion_mask"]
            counts.update(
                generated=int(mask.sum()),
                trained=int(mask.sum()),
                sequences=int(mask.shape[0]),
                width=int(out["completion_ids"].shape[1]),
            )
            return out

        trainer._generate_and_score_completions = timed_generate

        class Sync(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if next_command() != "step":
                    sys.stdout.flush()
                    os._exit(0)
                rollout_time[0] = 0.0
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                dt = time.perf_counter() - self.t0
                emit(
                    {
                        "seconds": dt,
                        "rollout_s": rollout_time[0],
                        "update_s": dt - rollout_time[0],
                        "updates": 1,
                        **counts,
                    }
                )

        trainer.add_callback(Sync())
        emit(
            {
                "ready": True,
                "side": "trl",
                "prompt_ids_0": ids0,
                "trl": trl.__version__,
                "params": sum(p.numel() for p in hf.parameters()),
            }
        )
        trainer.train()


# ----------------------------------------------------------------------------------------------------------
# The parent: venv, data, workers, alternation


def running_site_dirs() -> list[str]:
    """The site-packages folders of the running interpreter (a venv, conda or the system), in import order."""
    import site

    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def make_env(venv: str, install: list[str], constraints: str | None = None) -> str:
    """A virtual environment that sees exactly the running environment's packages, plus `install` in its own
    site-packages (which come first). Returns its python.

    `python -m venv --system-site-packages` is not that: run from inside a venv it exposes the BASE interpreter's
    packages, not the running venv's (PITFALLS.md). Instead a .pth file in the new venv adds every site folder of
    the running interpreter with `site.addsitedir` (so their own .pth files, editable installs included, apply
    too), and pip, which reads installed packages from sys.path, installs only what is missing."""
    import venv as venv_module

    venv_module.create(venv, with_pip=bool(install), clear=True)
    py = os.path.join(venv, "bin", "python")
    probe = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "_running_env.pth"), "w") as f:
        f.writelines(f"import site; site.addsitedir({d!r})\n" for d in running_site_dirs())
    if install:
        cmd = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *install]
        subprocess.run(cmd + (["-c", constraints] if constraints else []), check=True)
    return py


def trl_python() -> str:
    """The TRL venv's python, creating the venv on first use (never pulling another torch)."""
    import torch
    import transformers

    venv = os.environ.get("TRL_VENV", os.path.join(ROOT, ".venv-trl"))
    py = os.path.join(venv, "bin", "python")
    probe = "import trl, torch, transformers, PIL; print(trl.__version__, torch.__version__, transformers.__version__)"
    want = f"{TRL_VERSION} {torch.__version__} {transformers.__version__}"

    def ok() -> bool:
        r = subprocess.run([py, "-c", probe], capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.split() == want.split()

    if os.path.exists(py) and ok():
        return py
    print(
        f"creating the TRL environment in {venv} (trl {TRL_VERSION}, reusing torch {torch.__version__})",
        flush=True,
    )
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={torch.__version__.split('+')[0]}\ntransformers=={transformers.__version__}\n")
    make_env(venv, [f"trl=={TRL_VERSION}"], constraints=f.name)
    os.unlink(f.name)
    if not ok():
        r = subprocess.run([py, "-c", probe], capture_output=True, text=True)
        raise SystemExit(
            f"TRL environment {venv}: expected '{want}', got '{r.stdout.strip()}' {r.stderr[-500:]}"
        )
    return py


class Worker:
    def __init__(self, python: str, side: str, a, model: str, data: str, log):
        cmd = [python, os.path.abspath(__file__), "--worker", side, "--model", model, "--data", data]
        for k in ("prompts", "group_size", "max_new_tokens", "threads", "temperature", "top_p", "lr"):
            cmd += [f"--{k}", str(getattr(a, k))]
        threads = dict(OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
        env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **threads)
        self.side = side
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.p = subprocess.Popen(cmd, **pipes, text=True, env=env, cwd=ROOT)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.p.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
        raise RuntimeError(f"{self.side} worker exited (code {self.p.wait()}); see its log")

    def step(self) -> dict:
        self.p.stdin.write("step\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()


def compare(model: str, a, data: str, trl_py: str, log) -> dict:
    print(
        f"\n== {model}: {a.prompts} prompts x {a.group_size} samples, {a.max_new_tokens} new tokens each, "
        f"{a.threads} thread(s), temperature {a.temperature}, top_p {a.top_p}",
        flush=True,
    )
    ours = Worker(sys.executable, "ours", a, model, data, log)
    trl = Worker(trl_py, "trl", a, model, data, log)
    try:
        same = ours.info["prompt_ids_0"] == trl.info["prompt_ids_0"]
        print(
            f"parameters {ours.info['params']:,} (TRL side {trl.info['params']:,}); prompt 0 is "
            f"{len(ours.info['prompt_ids_0'])} tokens, identical token ids on both sides: {same}",
            flush=True,
        )
        if not same:
            raise SystemExit("the two sides do not see the same prompt tokens")
        warm = {"ours": ours.step(), "trl": trl.step()}
        print(
            f"warm-up: ours {warm['ours']['seconds']:.2f} s, trl {warm['trl']['seconds']:.2f} s", flush=True
        )
        runs = {"ours": [], "trl": []}
        ratios = []
        for r in range(a.repeats):
            order = (ours, trl) if r % 2 == 0 else (trl, ours)
            res = {w.side: w.step() for w in order}
            for side in runs:
                runs[side].append(res[side])
            ratios.append(res["ours"]["seconds"] / res["trl"]["seconds"])
            print(
                f"pair {r + 1}: ours {res['ours']['seconds']:.2f} s (rollout {res['ours']['rollout_s']:.2f}), "
                f"trl {res['trl']['seconds']:.2f} s (rollout {res['trl']['rollout_s']:.2f}), "
                f"ratio {ratios[-1]:.3f}",
                flush=True,
            )
    finally:
        ours.close()
        trl.close()
    summary = {"model": model, "ratio": statistics.median(ratios), "ratios": ratios}
    for side, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("seconds", "rollout_s", "update_s")}
        summary[side] = {
            **med,
            "generated": rs[-1]["generated"],
            "trained": rs[-1]["trained"],
            "sequences": rs[-1]["sequences"],
            "updates": rs[-1]["updates"],
        }
        if "reward_std" in rs[-1]:
            summary[side]["reward_std_within_groups"] = statistics.mean(x["reward_std"] for x in rs)
        print(
            f"{side:>4}: median step {med['seconds']:.2f} s = rollout {med['rollout_s']:.2f} + update "
            f"{med['update_s']:.2f}; per step {rs[-1]['sequences']} sequences, {rs[-1]['generated']} tokens "
            f"generated, {rs[-1]['trained']} trained, {rs[-1]['updates']} update(s)"
        )
    std = summary["ours"].get("reward_std_within_groups", float("nan"))
    print(f"mean within-group reward std (ours): {std:.4f}")
    pairs = ", ".join(f"{x:.3f}" for x in ratios)
    print(f"{model}: median ratio ours/trl {summary['ratio']:.3f} (pairs: {pairs})")
    tokens = {side: (summary[side]["generated"], summary[side]["trained"]) for side in ("ours", "trl")}
    if tokens["ours"] != tokens["trl"]:
        print("WARNING: the two sides did not generate / train on the same number of tokens")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 prompts x 4 samples, 16 new tokens")
    ap.add_argument("--models", default="tiny,tiny-qwen")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="alternating pairs (the median of at least 5)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument(
        "--data", default="", help="mm JSONL with one image per record (default: the synthetic task)"
    )
    ap.add_argument("--json", default="", help="also write the summary here")
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    if a.worker:
        (ours_worker if a.worker == "ours" else trl_worker)(a)
        return
    if a.quick:
        a.prompts, a.group_size, a.max_new_tokens = 2, 4, 16
    a.repeats = max(5, a.repeats)
    trl_py = trl_python()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if not data:
            import synth

            empty = dict(n_sft=0, n_sft_test=0, n_text_train=0, n_mm_test=0, n_text_test=0)
            synth.write_synth(tmp, synth.SynthConfig(seed=0, n_mm_train=max(8, a.prompts), **empty))
            data = os.path.join(tmp, "mm_train.jsonl")
        log_path = os.path.join(tmp, "workers.log")
        results = []
        with open(log_path, "w") as log:
            try:
                for model in a.models.split(","):
                    results.append(compare(model, a, data, trl_py, log))
            except BaseException:
                log.flush()
                with open(log_path) as f:
                    sys.stderr.write(f.read()[-4000:])
                raise
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results, "date": time.strftime("%Y-%m-%d")}, f, indent=2)
    print("ratio ours/trl: " + ", ".join(f"{r['model']} {r['ratio']:.3f}" for r in results))


if __name__ == "__main__":
    main()
