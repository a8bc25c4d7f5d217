"""What every stage script shares: config parsing, torch.distributed set-up, jsonl logs, checkpoints.

- `parse_config(Config, argv)`: a dataclass filled from `--config FILE.yaml` then `--key=value` / `--key value`
  overrides (CONTRACT: command line). `--help` lists every field with type and default; an unknown key is an
  error naming it. Values are parsed by the field's type, never executed.
- `init_distributed()`: torchrun (NCCL on GPU, gloo on CPU) or a single process.
- `JsonlLog`: append-only jsonl that, on resume, is cut back to the resumed step (no step twice).
- `save_checkpoint` / `load_checkpoint`: torch.distributed.checkpoint (each rank writes its own shard of the
  model and optimizer, nothing is gathered on one rank) plus per-rank RNG and a json `state` (step, data
  position, scheduler); written to `step_NNNNNN.tmp` and renamed, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import json
import os
import random
import re
import shutil
import signal
import sys
import types
import typing
import warnings
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist


class ConfigError(ValueError):
    pass


class NonFiniteError(RuntimeError):
    """Too many non-finite optimizer steps in a row: the run stops (its last checkpoint is intact)."""


# ----------------------------------------------------------------------------------------------------------
# Config


def _convert(name: str, tp, raw):
    """Parse a command-line string (or a YAML value) into the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        return _convert(name, args[0], raw)
    if not isinstance(raw, str):  # YAML already typed it
        if tp is float and isinstance(raw, int):
            return float(raw)
        if tp is str:  # `bf16: true` or `resume: false` in YAML: the field's own spelling
            return str(raw).lower() if isinstance(raw, bool) else str(raw)
        return raw
    try:
        if tp is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(float(raw)) if "e" in raw.lower() else int(raw)
        if tp is float:
            return float(raw)
        if origin is list:
            return [_convert(name, typing.get_args(tp)[0], x) for x in raw.split(",") if x]
        return raw
    except ValueError:
        raise ConfigError(f"--{name}: cannot parse {raw!r} as {getattr(tp, '__name__', tp)}") from None


def _field_help(cls) -> dict[str, str]:
    """Each field's help: `metadata["help"]`, else the comment that ends its line in the class source (the
    configs are documented where they are defined; subclasses override their parents' comments)."""
    import inspect

    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for name, comment in re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.M):
            out[name] = comment.strip()
    for f in fields(cls):
        if f.metadata.get("help"):
            out[f.name] = f.metadata["help"]
    return out


def type_name(tp) -> str:
    """`int`, `float`, `list[float]`, `int|None`: one word, as --help prints it."""
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace(" ", "")


def config_help(cls) -> str:
    """The one help format of every command: each field with its type, default and help."""
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    lines = [
        f"{cls.__doc__ or cls.__name__}",
        "",
        "Fields (--key=value or --key value; --config FILE.yaml sets several):",
    ]
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = type_name(hints[f.name])
        lines.append(f"  --{f.name:<24} {tp:<12} default {default!r:<14} {helps.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def parse_config(cls, argv: list[str] | None = None):
    """Build `cls` (a dataclass) from an optional YAML file and `--key=value` / `--key value` overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(config_help(cls))
        sys.exit(0)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (expected --key=value)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif hints.get(arg[2:].replace("-", "_")) is bool and (
            i + 1 == len(argv) or argv[i + 1].startswith("--")
        ):
            key, value = arg[2:], "true"  # a bare boolean flag: `--blank_images`
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{arg[2:]} needs a value")
            key, value = arg[2:], argv[i + 1]
            i += 1
        pairs.append((key.replace("-", "_"), value))
        i += 1
    values: dict = {}
    for key, value in pairs:
        if key == "config":
            import yaml

            with open(value) as f:
                loaded = yaml.safe_load(f) or {}
            for k, v in loaded.items():
                if k not in names:
                    raise ConfigError(f"{value}: unknown config key {k!r}")
                values[k] = _convert(k, hints[k], v)
    for key, value in pairs:
        if key == "config":
            continue
        if key not in names:
            raise ConfigError(f"unknown config key --{key} (see --help)")
        values[key] = _convert(key, hints[key], value)
    return cls(**values)


def main_guard(fn, cls):
    """Run `fn(cfg)`; bad configuration or data exits non-zero with one clear line.

    A distributed run (a process group is up) ends in `_leave`: the group is destroyed and the process exits
    without the interpreter's shutdown. Left to that shutdown, gloo's threads can still hold Python objects while
    the interpreter is torn down, and the rank aborts after its work is done ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#190489, #179291): seen in CI on rank 1 after SFT's final save."""
    from data import DataError

    # `kill -USR1 PID` prints every thread's Python stack to stderr and the process carries on: where a hung
    # rank waits (tests/conftest.py's run_command does it to a stage that overruns its time).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        cfg = parse_config(cls)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    try:
        fn(cfg)
    except (DataError, ConfigError, NonFiniteError, FileNotFoundError) as e:
        if not dist.is_initialized():
            sys.exit(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        _leave(1)
    if dist.is_initialized():
        _leave(0)


def _leave(code: int) -> None:
    """Destroy the process group, flush what the process wrote, exit with `code` at once (no atexit handlers:
    math-verify children exit when their pipe closes; files are closed where they are written)."""
    import logging

    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------------------
# Distributed


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto", timeout_min: float = 180) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs, gloo on CPU. Single process otherwise.

    `timeout_min` bounds every collective. torch's default (30 minutes for gloo, 10 for NCCL) is shorter than
    the skew between ranks after a long rollout step at paper scale (a rank whose group runs to 8k tokens
    keeps the others waiting at the first collective), so the stages default to 3 hours (`dist_timeout_min`)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min)
        )
    return Dist(rank, world, local, dev)


def resolve_bf16(value: str | bool, d: Dist) -> bool:
    """`bf16` as every stage reads it: auto (on with CUDA), true or false."""
    text = str(value).lower()
    if text not in ("auto", "true", "false"):
        raise ConfigError(f"--bf16 must be auto, true or false, got {value!r}")
    return d.device.type == "cuda" if text == "auto" else text == "true"


class PhaseMemory:
    """Peak memory of each phase of a run, in MB, for the logs and for memory.py's check.

    GPU: torch.cuda.max_memory_allocated (tensors only), reset at each phase's start. CPU: the process's peak
    resident set (VmHWM in /proc/self/status, reset by writing 5 to /proc/self/clear_refs) above its resident
    set when this object was made, before the model was loaded. On CPU it is only as good as the allocator's
    willingness to return freed memory (run with MALLOC_MMAP_THRESHOLD_=65536 to make every large tensor its
    own mapping, as tests/test_memory.py does); where /proc is missing, the CPU numbers are 0."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.base = 0 if self.cuda else self._status_kb("VmRSS")

    @staticmethod
    def _status_kb(key: str) -> int:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
        except (OSError, StopIteration, ValueError):
            return 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_mb(self) -> float:
        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return round(max(0, self._status_kb("VmHWM") - self.base) / 1024, 1)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}; got {value!r}")


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.on:
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_gather_objects(obj, d: Dist) -> list:
    if not d.on:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, d: Dist):
    if not d.on:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.on:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Logs


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class JsonlLog:
    """One JSON object per line, written by rank 0; `truncate_after(step)` drops lines past a resumed step."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not os.path.exists(self.path):
            return
        # a line cut by a kill mid-write has no newline, or does not parse: dropped
        with open(self.path) as f:
            keep = [ln for ln in f if ln.endswith("\n") and ln.strip() and _step_of(ln) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, rows: dict | list[dict]) -> None:
        if not self.enabled:
            return
        rows = [rows] if isinstance(rows, dict) else rows
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve_resume(resume: str, out_dir: str, d: Dist) -> str | None:
    """The checkpoint to start from, as every stage reads `resume`: auto (the newest complete checkpoint in
    out_dir, if any), true (the same, and an error if there is none), false (start over: old checkpoints are
    removed so a later rerun cannot resume from them), or a checkpoint path.

    Rank 0 decides and every rank takes its decision: ranks that see a shared file system differently (a
    checkpoint renamed a moment ago, a stale NFS cache) would otherwise start from different steps."""
    decision, error = None, None
    if d.main:
        text = str(resume).lower()
        if text in ("auto", "true", "yes", "1"):
            decision = latest_checkpoint(out_dir)
            if decision is None and text != "auto":
                error = f"--resume {resume}: no complete checkpoint in {out_dir}/ckpt"
        elif text in ("false", "no", "0", "never"):
            shutil.rmtree(os.path.join(out_dir, "ckpt"), ignore_errors=True)
        elif os.path.isfile(os.path.join(resume, "state.json")):
            decision = resume
        else:
            error = f"--resume {resume}: not a complete checkpoint (no state.json)"
    decision, error = broadcast_object((decision, error), d)
    if error:
        raise FileNotFoundError(error)
    return decision


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint (`step_NNNNNN`; a `.tmp` left by a crash mid-write is ignored)."""
    root = os.path.join(out_dir, "ckpt")
    if not os.path.isdir(root):
        return None
    names = [d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")]
    done = sorted(d for d in names if os.path.isfile(os.path.join(root, d, "state.json")))
    return os.path.join(root, done[-1]) if done else None


def _app_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def debug_kill_hook(point: str, step: int) -> None:
    """Test-only crash injection: with REVISUAL_TEST_KILL="<point>:<step>" the process SIGKILLs itself there.
    Points: "save" (inside save_checkpoint: shards written, not yet renamed), "saved" (callers: just after)."""
    if os.environ.get("REVISUAL_TEST_KILL") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _single_process_dcp():
    """torch.distributed.checkpoint warns on every call without a process group ("assuming the intent is to
    save in a single process"), which is exactly our intent for one process: that one warning, here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_checkpoint(out_dir: str, step: int, model, optimizer, state: dict, d: Dist, keep: int = 2) -> str:
    """Sharded model + optimizer through torch.distributed.checkpoint, per-rank RNG, and `state` (json)."""
    import torch.distributed.checkpoint as dcp

    root = os.path.join(out_dir, "ckpt")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(d)
    with _single_process_dcp():
        dcp.save(_app_state(model, optimizer), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save(rng_state(), os.path.join(tmp, f"rng_{d.rank}.pt"))
    debug_kill_hook("save", step)
    barrier(d)
    if d.main:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(state, step=step, world=d.world), f)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # the commit point: a checkpoint exists only once it is complete
        old = sorted(x for x in os.listdir(root) if x.startswith("step_") and not x.endswith(".tmp"))
        for x in old[:-keep]:
            shutil.rmtree(os.path.join(root, x), ignore_errors=True)
    barrier(d)
    return final


def load_checkpoint(path: str, model, optimizer, d: Dist) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return the json state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    app = _app_state(model, optimizer)
    with _single_process_dcp():
        dcp.load(app, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=app["model"], optim_state_dict=app["optim"])
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    rng_file = os.path.join(path, f"rng_{d.rank}.pt")
    if state.get("world") == d.world and os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
