"""memory.py against measurement: `python grpo_mm.py` (one process) and `torchrun --nproc_per_node 2 grpo_mm.py`
(FSDP2) on a mid-size checkpoint log each phase's measured peak (metrics.jsonl `mem_rollout_mb`, `mem_update_mb`:
peak resident memory above the process's memory before the model was loaded; rank 0's under torchrun), and
memory.py's prediction for the same config must be within 25% of it, with gradient checkpointing on (one
process) and off (FSDP2).

The checkpoint: a Qwen2.5-VL with 8 wider decoder layers (hidden 512, MLP 1536, GQA 8/2 heads) and a 4k or 32k
vocabulary, random weights (30M / 60M parameters), so weights, gradients and AdamW, the activations of a
micro-batch and the log-prob blocks (0.6 GB at 32k) are each far above the interpreter's noise. Completions are
forced to a fixed length (min_new_tokens) and max_prompt_len is the data's longest prompt, so the config's worst
case is what the run does. Also here: the per-layer activation formula against autograd's saved tensors, and
the 7B config headers against the model's current output.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_commands import torchrun

import model as M
from conftest import ROOT, sized_tiny_config

pytestmark = pytest.mark.slow

NEW_TOKENS = 192


def mid_run_inputs(root, vocab: int) -> tuple[str, str, int]:
    """(checkpoint dir, RL data file, longest prompt in tokens) for the mid-size model with `vocab` rows."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    import data as D
    import synth

    tok = M.build_tokenizer("tiny")
    base = M.tiny_config(tok)
    layers = dict(intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
    cfg = sized_tiny_config(base, 512, [8, 12, 12], vocab_size=vocab, **layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            cfg, attn_implementation="sdpa", dtype=torch.float32
        )
    ckpt = str(root / "ckpt")
    processor = M.build_processor(tok, M.build_image_processor(M.TINY_MIN_PIXELS, M.TINY_MAX_PIXELS))
    M.save_model(model, processor, ckpt)
    synth.write_synth(
        str(root),
        synth.SynthConfig(
            seed=0, n_sft=0, n_sft_test=0, n_mm_train=16, n_text_train=0, n_mm_test=0, n_text_test=0
        ),
    )
    data = str(root / "mm_train.jsonl")
    prompt, placement = M.recorded_prompt(ckpt)
    longest = max(D.prompt_length(r, processor, prompt, placement) for r in D.load_records(data))
    return ckpt, data, longest


def measured_and_predicted(tmp_path, ckpt_on: bool, vocab: int, nproc: int, micro: int) -> tuple[dict, dict]:
    import memory

    ckpt, data, longest = mid_run_inputs(tmp_path, vocab)
    flags = {
        "model": ckpt,
        "data": data,
        "out_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "rollout_batch": 4,
        "group_size": 4,
        "rollout_micro_batch": 2,
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "max_prompt_len": longest,
        "mini_batch": 16,
        "micro_batch": micro,
        "pad_mode": "off",
        "save_every": 0,
        "gradient_checkpointing": ckpt_on,
        "max_pixels": 112 * 112,
    }
    # max_pixels: the synthetic images' largest (the config's worst case is then the run's)
    if nproc == 1:  # in-loop validation at the end (greedy, 8 prompts per generate call): its peak too
        flags.update(eval_data=data, eval_limit=8)
    launch = [sys.executable, "grpo_mm.py"]
    if nproc > 1:  # the README's torchrun line (+ a free port): FSDP2 over the ranks, rank 0's peaks logged
        launch = [*torchrun(nproc), "grpo_mm.py"]
    cmd = [*launch, *[f"--{k}={v}" for k, v in flags.items()]]
    # Every tensor over 64 kB its own mapping, returned to the system when freed: resident memory then follows
    # the live tensors (glibc's default keeps freed heap memory, and its threshold adapts upwards).
    env = dict(
        os.environ, OMP_NUM_THREADS=str(2 // nproc), HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="65536"
    )
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    last = rows[-1]  # step 2: AdamW's moments exist, as in every step after the first
    run = memory.run_from_config(flags, world=nproc, device="cpu")
    arch = memory.arch_for(ckpt)
    predicted = {k: sum(v.values()) / 2**20 for k, v in memory.phases(arch, run).items()}
    print(memory.report(arch, run, f"gradient checkpointing {ckpt_on}"))
    measured = {"rollout": last["mem_rollout_mb"], "update": last["mem_update_mb"]}
    expected = {
        "rollout": predicted["rollout"],
        "update": max(predicted["update (forward + backward)"], predicted["optimizer step"]),
    }
    if "eval_data" in flags:
        measured["validation"], expected["validation"] = last["mem_validation_mb"], predicted["validation"]
    return measured, expected


# One process, checkpointed, a 4k vocabulary: one layer's recomputation and backward (not the log-prob blocks) is
# the backward's peak. torchrun x2 (FSDP2, each rank a shard of the weights, gradients and AdamW, the root and
# the layers gathered in turn, the whole model gathered for generation), not checkpointed, a 32k vocabulary:
# every layer's activations plus the log-prob blocks.
@pytest.mark.parametrize(
    "ckpt_on,vocab,nproc,micro",
    [(True, 4096, 1, 8), (False, 32768, 2, 4)],
    ids=["one-process-checkpointing", "fsdp2-x2"],
)
def test_memory_model_within_25_percent_of_a_measured_grpo_run(tmp_path, ckpt_on, vocab, nproc, micro):
    measured, predicted = measured_and_predicted(tmp_path, ckpt_on, vocab, nproc, micro)
    assert set(measured) == ({"rollout", "update", "validation"} if nproc == 1 else {"rollout", "update"})
    for phase in measured:
        ratio = predicted[phase] / measured[phase]
        print(
            f"{phase}: measured {measured[phase]:.0f} MB, predicted {predicted[phase]:.0f} MB (x{ratio:.2f})"
        )
        assert 0.75 <= ratio <= 1.25, (phase, measured, predicted)


def test_run_from_config_reads_the_worst_case_and_packing():
    """The config -> Run mapping, by hand: micro-batch rows x (prompt + completion), slots = rollout_micro_batch x
    group_size, prefill = the prompts of one admission; packing: one budget-wide row without a mask."""
    import memory

    cfg = {
        "max_prompt_len": 8192,
        "max_new_tokens": 8192,
        "micro_batch": 4,
        "rollout_micro_batch": 2,
        "group_size": 8,
        "bf16": True,
        "gradient_checkpointing": True,
        "max_pixels": 4194304,
    }
    run = memory.run_from_config(cfg, world=8)
    assert (run.rows, run.width, run.targets, run.precision, run.fsdp) == (4, 16384, 4 * 8192, "bf16", True)
    assert (run.slots, run.kv_len, run.prefill_rows, run.patches) == (16, 16384, 2, 4 * (4194304 // 196))
    packed = memory.run_from_config(dict(cfg, micro_batch_tokens=20000), world=8)
    assert (packed.rows, packed.width, packed.padded, packed.packed) == (1, 20000, False, True)
    assert memory.run_from_config(dict(cfg, bf16=False), world=1).precision == "fp32"
    assert memory.run_from_config(cfg, world=1).precision == "autocast"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast"])
def test_layer_activations_match_autograd_saved_tensors(precision):
    """The per-token formula against the bytes autograd saves inside one decoder layer, in each precision: fp32,
    bf16 weights (what FSDP2's mixed precision computes with) and bf16 autocast over fp32 weights. Per token =
    the growth between two sequence lengths, so per-call constants (autocast's weight copies, rotary tables)
    cancel."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    import memory

    h, i, kv = 256, 768, 128
    text = dict(
        hidden_size=h, intermediate_size=i, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(text, vocab_size=512, pad_token_id=0, rope_parameters=rope),
        vision_config=dict(M.TINY_VISION, out_hidden_size=h),
        image_token_id=511,
        video_token_id=510,
        vision_start_token_id=509,
        vision_end_token_id=508,
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layer, inside = model.model.language_model.layers[1], [False]
    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def saved_in_layer(length: int) -> int:
        seen: dict[int, int] = {}

        def pack(t):  # storages first saved inside layer 1, not parameters
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen[ptr] = t.untyped_storage().nbytes() if inside[0] else 0
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model.model(input_ids=torch.randint(0, 500, (2, length)), use_cache=False)
        return sum(seen.values())

    measured = (saved_in_layer(300) - saved_in_layer(100)) / (2 * 200)
    predicted = memory.layer_activations(h, i, kv, precision, padded=False, width=0)
    assert abs(measured - predicted) / predicted < 0.02, (measured, predicted)


@pytest.mark.parametrize("name", ["sft_7b", "grpo_mm_7b", "grpo_text_7b"])
def test_config_headers_quote_the_memory_model(name):
    """Each 7B config's header quotes `python memory.py configs/NAME.yaml`'s phase totals (so a change to the
    config or the model that moves them must update the header)."""
    import yaml

    import memory

    path = os.path.join(ROOT, "configs", f"{name}.yaml")
    with open(path) as f:
        text = f.read()
    cfg = yaml.safe_load(text)
    totals = {
        k: sum(v.values()) / memory.GB
        for k, v in memory.phases(memory.arch_for(cfg["model"]), memory.run_from_config(cfg, 8)).items()
    }
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for phase, gb in totals.items():
        assert f"{gb:.1f} GB" in header, (name, phase, gb)
