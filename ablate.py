"""Ablations with their seed spread, in one command: vary one config field of a stage over values, run every
variant for every seed from the same starting checkpoint, evaluate each run on held-out splits, and write a
table, a plot and a plain verdict on whether the differences are larger than the seed spread.

    python ablate.py --stage grpo_mm --model out/pipeline/sft/final --vary pad_mode=paper,filter,off \
        --seeds 0,1,2 --bench mm=DATA/mm_test.jsonl,text=DATA/text_test.jsonl --blank mm \
        --out_dir out/ablate_pad  [the stage's own --key=value ..., e.g. --data DATA/mm_train.jsonl --max_steps 100]

Every run is a subprocess running the stage's own command line (`python grpo_mm.py --key=value ...`, or
`torchrun --standalone --nproc_per_node N grpo_mm.py ...` with `--nproc N`), then eval.py's command line on the
held-out splits (and again with `--blank_images` for the labels in `--blank`). Any argument that is not a field
of this command passes through to every run unchanged (`--set KEY=VALUE,...` does the same in one argument);
each run's full command line is checked against the stage's config before anything starts.

Concurrency: `--parallel P` runs P runs at once on CPU (give each `--threads T`); `--devices 0,1,2,3` runs one
run per device (with `--nproc N`, one per N devices, under torchrun), through CUDA_VISIBLE_DEVICES.

Layout under out_dir: `runs/FIELD=VALUE/seedS/{train,eval,eval_blank}/` (train is the stage's out_dir, with its
log `train.log`), `start/eval*/` (the starting checkpoint, evaluated once), `ablation.md`, `ablation.json`,
`ablation.png`. Resumable: a run is finished when its `train/final/` and its eval `results.json` (and the blank
one, when asked) exist; a rerun skips it and reruns only what is missing (a stage resumes from its own newest
checkpoint; eval.py skips the items it already predicted). The table always comes from the files on disk.

The seed-spread rule (the verdict): for variants a and b on the metric (accuracy on `--metric`, default the
first label of `--bench`), with range = max - min over a variant's seeds, the difference is called OUTSIDE the
seed spread only when |mean_a - mean_b| > max(range_a, range_b); otherwise it is INSIDE the seed spread and the
table says "not established at this number of seeds". With fewer than 2 seeds there is no spread to compare with,
and it says so. (The range rule is deliberately conservative for 2-5 seeds, where a standard deviation is
itself too noisy to lean on; the standard deviation is reported beside it.)
"""

from __future__ import annotations

import json
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields

import common as C

ROOT = os.path.dirname(os.path.abspath(__file__))
STAGES = {"sft": "SFTConfig", "grpo_mm": "GRPOConfig", "grpo_text": "GRPOTextConfig"}
RESERVED = ("model", "seed", "out_dir")  # set by this command for every run
RULE = (
    "outside the seed spread only when |mean_a - mean_b| > max(range_a, range_b), "
    "range = max - min over seeds"
)


@dataclass
class AblateConfig:
    """python ablate.py --stage STAGE --model START --vary FIELD=V1,V2,... --seeds 0,1,2 --bench LABEL=PATH[,...]
    [--KEY=VALUE of the stage ...] (see ablate.py's docstring; unknown keys pass through to the stage)."""

    stage: str = "grpo_mm"  # sft | grpo_mm | grpo_text
    model: str = ""  # the starting checkpoint of every run (the stage's --model); required
    vary: str = ""  # FIELD=V1,V2,...: one field of the stage's config and its values; required
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run per value and seed
    set: str = ""  # fixed stage overrides KEY=VALUE,KEY=VALUE (a piece without '=' continues the last value)
    bench: str = ""  # held-out splits, eval.py's --bench LABEL=PATH[,...]; required
    blank: str = ""  # labels of --bench evaluated again with every image blanked (column LABEL_blank)
    metric: str = ""  # the label of the plot and the verdict; "" = the first label of --bench
    eval_start: bool = True  # evaluate the starting checkpoint once (the `start` row and the gains)
    eval_max_new_tokens: int = 64  # eval.py --max_new_tokens for every eval
    eval_batch_size: int = 64  # eval.py --batch_size for every eval
    out_dir: str = "out/ablate"  # one folder per run; ablation.md, ablation.json, ablation.png
    nproc: int = 1  # > 1: every run (and its eval) under torchrun --standalone --nproc_per_node nproc
    devices: str = ""  # GPU ids (0,1,2,3): one run per nproc of them at a time, via CUDA_VISIBLE_DEVICES
    parallel: int = 1  # runs at once when no devices are given (CPU)
    threads: int = 0  # OMP_NUM_THREADS of every run; 0 = the environment's
    dry_run: bool = False  # print what is left to run (the command lines) and stop


@dataclass
class Run:
    value: str  # the varied field's value ("start" for the starting checkpoint)
    seed: int | None
    dir: str

    @property
    def name(self) -> str:
        return (
            "start"
            if self.seed is None
            else f"{os.path.basename(os.path.dirname(self.dir))} seed {self.seed}"
        )


# ----------------------------------------------------------------------------------------------------------
# The plan: command lines, checked against the stage's config before anything runs


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this command's arguments, the ones that pass through to the stage)."""
    own = {f.name for f in fields(AblateConfig)} | {"config", "help"}
    mine: list[str] = []
    theirs: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else None
        group = mine if key is None or key in own or arg == "-h" else theirs
        group.append(arg)
        if key is not None and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            group.append(argv[i + 1])
            i += 1
        i += 1
    return mine, theirs


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    """KEY=VALUE,KEY=VALUE -> pairs; a piece without '=' continues the previous value (data=a.jsonl,b.jsonl)."""
    pairs: list[tuple[str, str]] = []
    for piece in (p for p in spec.split(",") if p):
        if "=" in piece:
            key, value = piece.split("=", 1)
            pairs.append((key.strip(), value))
        elif pairs:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + "," + piece)
        else:
            raise C.ConfigError(f"--set: {piece!r} is not KEY=VALUE")
    return pairs


def parse_vary(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise C.ConfigError("--vary FIELD=V1,V2,... is required")
    key, values = spec.split("=", 1)
    vals = [v for v in values.split(",") if v]
    if key in RESERVED:
        raise C.ConfigError(f"--vary {key}: set by ablate.py itself (seeds: --seeds; start: --model)")
    if len(vals) < 1 or len(set(vals)) != len(vals):
        raise C.ConfigError(f"--vary {spec}: give distinct values, comma-separated")
    return key, vals


def stage_config_class(stage: str):
    if stage not in STAGES:
        raise C.ConfigError(f"--stage {stage!r}: one of {', '.join(STAGES)}")
    module = __import__(stage)
    return getattr(module, STAGES[stage])


def slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", value) or "_"


def labels(cfg: AblateConfig) -> tuple[list[str], list[str]]:
    """(bench labels, blank labels)."""
    names = [p.split("=", 1)[0] for p in cfg.bench.split(",") if "=" in p]
    blank = [b for b in cfg.blank.split(",") if b]
    for b in blank:
        if b not in names:
            raise C.ConfigError(f"--blank {b}: not a label of --bench ({', '.join(names)})")
    return names, blank


def launcher(cfg: AblateConfig) -> list[str]:
    if cfg.nproc > 1:
        torchrun = ["torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}"]
        return [sys.executable, "-m"] + torchrun
    return [sys.executable]


def plan(cfg: AblateConfig, passthrough: list[str]) -> tuple[str, list[Run], dict[str, list[str]]]:
    """(field, runs, {run dir: the stage's arguments}); every run's arguments parse as the stage's config."""
    if not cfg.model or not cfg.bench:
        raise C.ConfigError("--model (the starting checkpoint) and --bench (held-out splits) are required")
    labels(cfg)
    cls = stage_config_class(cfg.stage)
    key, values = parse_vary(cfg.vary)
    fixed = [f"--{k}={v}" for k, v in parse_pairs(cfg.set)] + passthrough
    for arg in fixed:
        if arg.startswith("--") and arg[2:].split("=", 1)[0].replace("-", "_") in RESERVED + (key,):
            raise C.ConfigError(
                f"{arg}: set by ablate.py for every run (--model, --seeds, --vary, --out_dir)"
            )
    runs, args = [], {}
    for value in values:
        for seed in cfg.seeds:
            run = Run(value, seed, os.path.join(cfg.out_dir, "runs", f"{key}={slug(value)}", f"seed{seed}"))
            train_dir = os.path.join(run.dir, "train")
            argv = fixed + [
                f"--{key}={value}",
                f"--model={cfg.model}",
                f"--seed={seed}",
                f"--out_dir={train_dir}",
            ]
            C.parse_config(cls, argv)  # an unknown key or a bad value stops here, before any run starts
            runs.append(run)
            args[run.dir] = argv
    return key, runs, args


def eval_commands(cfg: AblateConfig, model: str, run_dir: str) -> list[tuple[list[str], str]]:
    """[(eval.py command, its out_dir)]: the held-out splits, then the blank-image ones when asked."""
    _, blank = labels(cfg)
    base = launcher(cfg) + [
        os.path.join(ROOT, "eval.py"),
        f"--model={model}",
        f"--max_new_tokens={cfg.eval_max_new_tokens}",
        f"--batch_size={cfg.eval_batch_size}",
    ]
    out = [(base + [f"--bench={cfg.bench}", f"--out_dir={run_dir}/eval"], f"{run_dir}/eval")]
    if blank:
        spec = ",".join(p for p in cfg.bench.split(",") if p.split("=", 1)[0] in blank)
        blank_dir = f"{run_dir}/eval_blank"
        out.append((base + [f"--bench={spec}", "--blank_images", f"--out_dir={blank_dir}"], blank_dir))
    return out


def steps(cfg: AblateConfig, run: Run, stage_args: list[str] | None) -> list[tuple[str, list[str], str]]:
    """What is left to do for a run: [(what, command, log path)]; [] when it is finished."""
    todo = []
    model = cfg.model
    if stage_args is not None:
        train = os.path.join(run.dir, "train")
        model = os.path.join(train, "final")
        if not os.path.isdir(model):
            train_cmd = launcher(cfg) + [os.path.join(ROOT, f"{cfg.stage}.py")] + stage_args
            todo.append(("train", train_cmd, os.path.join(run.dir, "train.log")))
    for cmd, out in eval_commands(cfg, model, run.dir):
        if not os.path.exists(os.path.join(out, "results.json")):
            todo.append(("eval", cmd, out + ".log"))
    return todo


# ----------------------------------------------------------------------------------------------------------
# Execution: a pool of slots (CPU processes or device groups), one run per slot at a time


def slots(cfg: AblateConfig) -> list[dict[str, str]]:
    """The environment of each slot."""
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    devices = [d for d in cfg.devices.split(",") if d]
    if not devices:
        return [env] * max(1, cfg.parallel)
    groups = [devices[i : i + cfg.nproc] for i in range(0, len(devices) - cfg.nproc + 1, cfg.nproc)]
    if not groups:
        raise C.ConfigError(f"--devices {cfg.devices}: fewer than --nproc {cfg.nproc} devices")
    return [dict(env, CUDA_VISIBLE_DEVICES=",".join(g)) for g in groups]


def execute(
    work: list[tuple[Run, list[tuple[str, list[str], str]]]], envs: list[dict[str, str]]
) -> list[str]:
    """Run each run's steps in order, runs concurrently over the slots; returns the failures (one line each)."""
    free: queue.Queue = queue.Queue()
    for env in envs:
        free.put(env)
    failures: list[str] = []
    lock = threading.Lock()

    def one(k: int, run: Run, todo: list) -> None:
        env = free.get()
        try:
            for what, cmd, log in todo:
                os.makedirs(os.path.dirname(log), exist_ok=True)
                t0 = time.time()
                with open(log, "a") as f:
                    f.write("$ " + " ".join(cmd) + "\n")
                    f.flush()
                    rc = subprocess.run(
                        cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()
                    ).returncode
                seconds = round(time.time() - t0, 1)
                with lock:
                    print(
                        f"[{k}/{len(work)}] {run.name}: {what} {'done' if rc == 0 else f'FAILED (exit {rc})'} "
                        f"in {seconds:.0f} s (log: {log})",
                        flush=True,
                    )
                    if rc:
                        failures.append(f"{run.name}: {what} exited {rc}; see {log}")
                        return
                    _record_seconds(run.dir, what, seconds)
        finally:
            free.put(env)

    threads = [threading.Thread(target=one, args=(k, run, todo)) for k, (run, todo) in enumerate(work, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def _record_seconds(run_dir: str, what: str, seconds: float) -> None:
    path = os.path.join(run_dir, "seconds.json")
    rec = _load(path) or {}
    rec[what] = round(rec.get(what, 0.0) + seconds, 1)
    with open(path, "w") as f:
        json.dump(rec, f)


def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------
# The table, the verdict, the plot


def results_of(cfg: AblateConfig, run_dir: str) -> dict[str, float] | None:
    """{label: accuracy, label_blank: accuracy} from the run's own results.json files; None if not evaluated."""
    names, blank = labels(cfg)
    main = _load(os.path.join(run_dir, "eval", "results.json"))
    if main is None:
        return None
    out = {n: main[n]["accuracy"] for n in names if n in main}
    blank_res = _load(os.path.join(run_dir, "eval_blank", "results.json")) or {}
    out.update({f"{n}_blank": blank_res[n]["accuracy"] for n in blank if n in blank_res})
    return out


def spread_stats(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "range": max(values) - min(values),
    }


def verdict(a: str, sa: dict, b: str, sb: dict) -> dict:
    """The seed-spread rule of the docstring, for one pair of variants."""
    diff = sa["mean"] - sb["mean"]
    spread = max(sa["range"], sb["range"])
    if min(sa["n"], sb["n"]) < 2:
        inside, text = None, "one seed only: no seed spread to compare with (run more seeds)"
    elif abs(diff) > spread:
        inside, text = False, "OUTSIDE the seed spread"
    else:
        inside, text = True, "INSIDE the seed spread: not established at this number of seeds"
    line = f"{a} - {b}: {100 * diff:+.1f} points; largest seed range {100 * spread:.1f} points: {text}"
    return {"a": a, "b": b, "diff": diff, "spread": spread, "inside": inside, "text": line}


def summarize(cfg: AblateConfig, key: str, runs: list[Run]) -> dict:
    names, blank = labels(cfg)
    cols = names + [f"{n}_blank" for n in blank]
    metric = cfg.metric or names[0]
    if metric not in cols:
        raise C.ConfigError(f"--metric {metric}: not one of {', '.join(cols)}")
    variants: dict[str, dict] = {}
    for run in runs:
        v = variants.setdefault(run.value, {"value": run.value, "name": f"{key}={run.value}", "runs": []})
        res = results_of(cfg, run.dir)
        if res is not None and os.path.isdir(os.path.join(run.dir, "train", "final")):
            seconds = _load(os.path.join(run.dir, "seconds.json")) or {}
            v["runs"].append({"seed": run.seed, "dir": run.dir, "results": res, "seconds": seconds})
    for v in variants.values():
        v["stats"] = {
            c: spread_stats([r["results"][c] for r in v["runs"]])
            for c in cols
            if v["runs"] and all(c in r["results"] for r in v["runs"])
        }
    done = sorted(
        (v for v in variants.values() if metric in v["stats"]), key=lambda v: -v["stats"][metric]["mean"]
    )
    pairs = [
        verdict(a["name"], a["stats"][metric], b["name"], b["stats"][metric])
        for i, a in enumerate(done)
        for b in done[i + 1 :]
    ]
    start = results_of(cfg, os.path.join(cfg.out_dir, "start")) if cfg.eval_start else None
    return {
        "stage": cfg.stage,
        "model": cfg.model,
        "field": key,
        "seeds": cfg.seeds,
        "metric": metric,
        "columns": cols,
        "start": start,
        "variants": list(variants.values()),
        "comparisons": pairs,
        "rule": RULE,
    }


def markdown(s: dict) -> str:
    m, seeds = s["metric"], s["seeds"]
    seed_cols = " | ".join(f"seed {x}" for x in seeds)
    gain_col = " gain vs start (points) |" if s["start"] else ""
    lines = [
        f"# Ablation: {s['stage']}, {s['field']} over {len(s['variants'])} values x seeds {seeds}",
        "",
        f"Starting checkpoint: `{s['model']}`. Held-out metric: `{m}` accuracy (fractions; a point is 0.01).",
        "",
        f"| {s['field']} | mean | {seed_cols} | std | range |{gain_col}",
        "|---" * (4 + len(seeds) + bool(s["start"])) + "|",
    ]
    if s["start"]:
        lines.append(f"| start | {s['start'][m]:.3f} | " + " | ".join("" for _ in seeds) + " |  |  |  |")
    for v in s["variants"]:
        by_seed = {r["seed"]: r["results"].get(m) for r in v["runs"]}
        st = v["stats"].get(m)
        cells = [f"{by_seed[x]:.3f}" if by_seed.get(x) is not None else "-" for x in seeds]
        head = f"| {v['value']} | {st['mean']:.3f} | " if st else f"| {v['value']} | - | "
        tail = f" | {st['std']:.3f} | {st['range']:.3f} |" if st else " | - | - |"
        gain = ""
        if s["start"]:
            gain = f" {100 * (st['mean'] - s['start'][m]):+.1f} |" if st else " - |"
        lines.append(head + " | ".join(cells) + tail + gain)
    lines += [
        "",
        "Every held-out column, mean over seeds (std):",
        "",
        f"| {s['field']} | " + " | ".join(s["columns"]) + " | train s (mean) |",
        "|---" * (len(s["columns"]) + 2) + "|",
    ]
    if s["start"]:
        start_cells = " | ".join(f"{s['start'].get(c, float('nan')):.3f}" for c in s["columns"])
        lines.append(f"| start | {start_cells} |  |")
    for v in s["variants"]:
        cells = [
            f"{v['stats'][c]['mean']:.3f} ({v['stats'][c]['std']:.3f})" if c in v["stats"] else "-"
            for c in s["columns"]
        ]
        secs = [r["seconds"].get("train", 0.0) for r in v["runs"]]
        train_s = statistics.fmean(secs) if secs else 0
        lines.append(f"| {v['value']} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    lines += ["", f"Verdict on `{m}` (rule: {s['rule']}):", ""] + [f"- {p['text']}" for p in s["comparisons"]]
    return "\n".join(lines) + "\n"


def plot(s: dict, path: str) -> None:
    """The metric per variant, every seed a dot (one colour per seed), the mean a bar, the start a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = s["metric"]
    fig, ax = plt.subplots(figsize=(1.8 * len(s["variants"]) + 3, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(s["variants"]):
        for j, seed in enumerate(s["seeds"]):
            r = next((r for r in v["runs"] if r["seed"] == seed), None)
            if r is not None and m in r["results"]:
                off = (j - (len(s["seeds"]) - 1) / 2) * 0.08
                label = f"seed {seed}" if i == 0 else None
                ax.plot(i + off, r["results"][m], "o", color=colors[j % len(colors)], label=label)
        if m in v["stats"]:
            ax.hlines(
                v["stats"][m]["mean"], i - 0.3, i + 0.3, color="black", lw=2, label="mean" if i == 0 else None
            )
    if s["start"]:
        ax.axhline(s["start"][m], ls="--", color="gray", label="start")
    ax.set_xticks(range(len(s["variants"])), [v["name"] for v in s["variants"]])
    ax.set_ylabel(f"{m} accuracy (held out)")
    inside = [p for p in s["comparisons"] if p["inside"]]
    ax.set_title(
        f"{s['stage']}: {s['field']}; {len(inside)} of {len(s['comparisons'])} differences inside the seed spread",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    mine, passthrough = split_argv(list(sys.argv[1:] if argv is None else argv))
    cfg = C.parse_config(AblateConfig, mine)
    key, runs, args = plan(cfg, passthrough)
    work = [(run, steps(cfg, run, args[run.dir])) for run in runs]
    if cfg.eval_start:
        start = Run("start", None, os.path.join(cfg.out_dir, "start"))
        work.insert(0, (start, steps(cfg, start, None)))
    todo = [(r, t) for r, t in work if t]
    print(
        f"ablate: {cfg.stage}, {key} = {', '.join(dict.fromkeys(r.value for r in runs))}, seeds {cfg.seeds}: "
        f"{len(todo)} to run, {len(work) - len(todo)} finished already",
        flush=True,
    )
    if cfg.dry_run:
        for run, steps_left in todo:
            for what, cmd, _ in steps_left:
                print(f"{run.name}: {what}: {' '.join(cmd)}")
        return {}
    if todo and cfg.model not in ("tiny", "tiny-qwen") and not os.path.isdir(cfg.model):
        raise C.ConfigError(
            f"--model {cfg.model}: no such checkpoint directory (the starting point of every run)"
        )
    failures = execute(todo, slots(cfg)) if todo else []
    summary = summarize(cfg, key, runs)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "ablation.json"), "w") as f:
        json.dump(summary, f, indent=2)
    md = markdown(summary)
    with open(os.path.join(cfg.out_dir, "ablation.md"), "w") as f:
        f.write(md)
    plot(summary, os.path.join(cfg.out_dir, "ablation.png"))
    print(md + f"\nwrote {cfg.out_dir}/ablation.md, ablation.json, ablation.png")
    if failures:
        raise RuntimeError(f"{len(failures)} step(s) failed:\n  " + "\n  ".join(failures))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (C.ConfigError, RuntimeError) as e:
        sys.exit(f"error: {e}")
