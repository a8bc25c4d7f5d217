"""Records in, batches out: JSONL records (CONTRACT.md), images, the chat template, SFT and RL batches.

- `load_records(path)`: validated records; every bad input raises `DataError` naming file, line and field
  (or, with `skip_bad=True`, is counted and logged as a warning, never silently dropped).
- `encode_prompt(record, processor)`: the record as chat messages with the paper's reasoning prompt
  (Fig. 5; system turn by default, or appended to the user turn), tokenised, each image processed once and
  its single `<|image_pad|>` expanded to the image's token count (grid_t * grid_h * grid_w / merge^2).
- `collate_sft`, `collate_prompts` (left-padded, for `generate`), `collate_sequences` (prompt + completion,
  right-padded, for scoring and training): `pixel_values` of the batch's images concatenated in sample order
  with `image_grid_thw`; `slice_pixel_values` cuts them back per sample.
- `python data.py synth --out_dir DIR ...` writes the built-in synthetic task (see synth.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("data")

# Paper Fig. 5, used for training and evaluation.
REASONING_PROMPT = (
    "You FIRST think about the reasoning process step by step as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE "
    "put in \\boxed{}."
)
# system turn (paper Fig. 5, default) or appended to the user turn (released code)
PLACEMENTS = ("system", "user")
VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


class DataError(ValueError):
    """Bad input; the message names the file, the line (or row) and the field."""


@dataclass
class Record:
    id: str
    problem: str
    answer: str
    images: list[str] = field(default_factory=list)  # absolute paths
    choices: list[str] | None = None
    solution: str | None = None
    source: str = ""  # "file:line", for error messages
    meta: dict = field(default_factory=dict)


@dataclass
class EncodedPrompt:
    record: Record
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (patches, C * T * P * P) for all the record's images, in order
    image_grid_thw: torch.Tensor | None  # (num_images, 3)


# ----------------------------------------------------------------------------------------------------------
# Records and images


def open_image(path: str, where: str) -> Image.Image:
    """Open an image fully (so corrupt bytes fail here, not mid-batch) and convert it to RGB."""
    if not os.path.isfile(path):
        raise DataError(f"{where}: field 'images': image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: field 'images': cannot decode image {path}: {e}") from None


def image_size(path: str, where: str) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels (a start-up check that costs a
    file open per image, not a decode: the pixels are decoded on the rank that uses them, when it does)."""
    if not os.path.isfile(path):
        raise DataError(f"{where}: field 'images': image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: field 'images': cannot decode image {path}: {e}") from None


def _check_str(obj: dict, key: str, where: str, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: field '{key}' is missing")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def parse_record(
    obj: object, base_dir: str, where: str, require_solution: bool = False, check_images: bool = True
) -> Record:
    """One JSON object -> Record, with every field checked. `where` is "file:line" for messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    problem = _check_str(obj, "problem", where, required=True)
    answer = _check_str(obj, "answer", where, required=True)
    solution = _check_str(obj, "solution", where, required=require_solution)
    rid = obj.get("id", where)
    if not isinstance(rid, (str, int)):
        raise DataError(f"{where}: field 'id' must be a string, got {type(rid).__name__}")
    for key, text in (("problem", problem), ("answer", answer), ("solution", solution)):
        if text and any(m in text for m in VISION_MARKERS):
            raise DataError(f"{where}: field '{key}' contains a vision special token (images go in 'images')")
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of strings")
        choices = choices or None
    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError(f"{where}: field 'images' must be a list of image paths (non-empty strings)")
    paths = []
    for rel in images:
        # Absolute paths as written (LLaMA-Factory / EasyR1 style data); relative ones from `base_dir`. The
        # user's own data file is not a security boundary: a path may point anywhere the user can read.
        path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(rel)))
        if check_images:
            open_image(path, where)
        paths.append(path)
    return Record(
        id=str(rid),
        problem=problem,
        answer=answer.strip(),
        images=paths,
        choices=choices,
        solution=solution,
        source=where,
    )


def load_records(
    paths: str | list[str],
    require_solution: bool = False,
    skip_bad: bool = False,
    check_images: bool = True,
    limit: int | None = None,
    image_dir: str = "",
) -> list[Record]:
    """JSONL records from one path, a comma-separated list, or a list of paths (CONTRACT: Data records).
    Relative image paths start from `image_dir` when given, else from the JSONL file's own folder."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    records, skipped = [], 0
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: data file not found")
        base = os.path.abspath(image_dir) if image_dir else os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                    records.append(parse_record(obj, base, where, require_solution, check_images))
                except DataError as e:
                    if not skip_bad:
                        raise
                    skipped += 1
                    log.warning("skipped bad record (%d so far): %s", skipped, e)
                if limit and len(records) >= limit:
                    break
    if skipped:
        log.warning("skipped %d bad record(s) in %s", skipped, ",".join(paths))
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{','.join(paths)}: field 'id': {dup!r} appears more than once")
    return records


# ----------------------------------------------------------------------------------------------------------
# Chat template and encoding


def build_messages(record: Record, prompt: str = REASONING_PROMPT, placement: str = "system") -> list[dict]:
    """The record as chat messages (paper Fig. 5); images first in the user turn, then the problem text."""
    if placement not in PLACEMENTS:
        raise ValueError(f"prompt placement must be one of {PLACEMENTS}, got {placement!r}")
    text = record.problem
    # a benchmark prompt may list them itself
    if record.choices and not record.meta.get("options_in_problem"):
        text += "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(record.choices))
    if placement == "user":
        text += "\n" + prompt
    content = [{"type": "image"} for _ in record.images] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if placement == "system":
        messages.insert(0, {"role": "system", "content": prompt})
    return messages


def encode_prompt(
    record: Record,
    processor,
    prompt: str = REASONING_PROMPT,
    placement: str = "system",
    max_prompt_len: int | None = None,
) -> EncodedPrompt:
    """Tokenised prompt (ending in '<|im_start|>assistant\\n') with each image processed once."""
    tokenizer = processor.tokenizer
    text = tokenizer.apply_chat_template(
        build_messages(record, prompt, placement), tokenize=False, add_generation_prompt=True
    )
    pixel_values = grid = None
    if record.images:
        images = [open_image(p, record.source) for p in record.images]
        out = processor.image_processor(images=images, return_tensors="pt")
        pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
        merge = processor.image_processor.merge_size
        pieces = text.split("<|image_pad|>")
        if len(pieces) != len(images) + 1:
            raise DataError(
                f"{record.source}: field 'images': {len(images)} images but {len(pieces) - 1} placeholders"
            )
        counts = (grid.prod(-1) // merge**2).tolist()
        text = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_prompt_len is not None and len(ids) > max_prompt_len:
        raise DataError(
            f"{record.source}: field 'problem': prompt is {len(ids)} tokens, over max_prompt_len "
            f"{max_prompt_len}"
        )
    return EncodedPrompt(record, ids, pixel_values, grid)


def prompt_length(
    record: Record, processor, prompt: str = REASONING_PROMPT, placement: str = "system"
) -> int:
    """Prompt tokens as encode_prompt makes them, from the image sizes alone: each image's header is read, its
    pixels are not decoded (the processor's min/max pixel bounds give its token count)."""
    tok, ip = processor.tokenizer, processor.image_processor
    text = tok.apply_chat_template(
        build_messages(record, prompt, placement), tokenize=False, add_generation_prompt=True
    )
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    for path in record.images:
        w, h = image_size(path, record.source)
        n += ip.get_number_of_image_patches(h, w, {}) // ip.merge_size**2 - 1
    return n


def encode_completion(text: str, tokenizer) -> list[int]:
    """An assistant turn's tokens, closed by <|im_end|> (trained, and counted in L_y)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [im_end]


def encode_all(
    records: list[Record],
    processor,
    prompt: str = REASONING_PROMPT,
    placement: str = "system",
    max_prompt_len: int | None = None,
    skip_bad: bool = False,
) -> list[EncodedPrompt]:
    out, skipped = [], 0
    for r in records:
        try:
            out.append(encode_prompt(r, processor, prompt, placement, max_prompt_len))
        except DataError as e:
            if not skip_bad:
                raise
            skipped += 1
            log.warning("skipped record (%d so far): %s", skipped, e)
    return out


# ----------------------------------------------------------------------------------------------------------
# Batches


def _cat_images(prompts: list[EncodedPrompt]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    pv = [p.pixel_values for p in prompts if p.pixel_values is not None]
    grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
    return (torch.cat(pv), torch.cat(grids)) if pv else (None, None)


def collate_sequences(
    prompts: list[EncodedPrompt], completions: list[list[int]], pad_id: int, image_token_id: int
) -> dict[str, torch.Tensor]:
    """Prompt + completion per sample, right-padded. `target_mask` marks completion tokens (those trained on);
    `labels` is input_ids with -100 outside them. A prompt repeated for its group is the same EncodedPrompt
    object: its pixels were processed once and are only concatenated again here."""
    seqs = [p.input_ids + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        target_mask[i, len(p.input_ids) : len(s)] = True
    pixel_values, grid = _cat_images(prompts)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "target_mask": target_mask,
        "labels": input_ids.masked_fill(~target_mask, -100),
        "mm_token_type_ids": (input_ids == image_token_id).int(),
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
    }


def collate_sft(
    prompts: list[EncodedPrompt], tokenizer, image_token_id: int, max_len: int | None = None
) -> dict[str, torch.Tensor]:
    """SFT batch: the record's `solution` is the assistant turn; loss on its tokens and the closing <|im_end|>."""
    completions = [encode_completion(p.record.solution or "", tokenizer) for p in prompts]
    if max_len is not None:
        for p, c in zip(prompts, completions):
            if len(p.input_ids) + len(c) > max_len:
                raise DataError(
                    f"{p.record.source}: field 'solution': prompt + solution is "
                    f"{len(p.input_ids) + len(c)} tokens, over max_len {max_len}"
                )
    return collate_sequences(prompts, completions, tokenizer.pad_token_id, image_token_id)


def collate_prompts(
    prompts: list[EncodedPrompt], pad_id: int, image_token_id: int
) -> dict[str, torch.Tensor]:
    """Left-padded prompts for `generate` (new tokens then line up at the right edge)."""
    width = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p.input_ids) :] = torch.tensor(p.input_ids)
        attention_mask[i, width - len(p.input_ids) :] = 1
    pixel_values, grid = _cat_images(prompts)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == image_token_id).int(),
    }
    if pixel_values is not None:
        batch.update(pixel_values=pixel_values, image_grid_thw=grid)
    return batch


def slice_pixel_values(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, images_per_sample: list[int]
) -> list[torch.Tensor]:
    """Cut a batch's concatenated `pixel_values` back into one tensor per sample.

    Image j owns grid_t * grid_h * grid_w consecutive rows (patches); sample i owns its images_per_sample[i]
    consecutive images. A sample without images gets an empty (0, D) tensor.
    """
    if sum(images_per_sample) != len(image_grid_thw):
        raise ValueError(f"{sum(images_per_sample)} images for {len(image_grid_thw)} grids")
    rows_per_image = image_grid_thw.prod(-1).tolist()
    if sum(rows_per_image) != pixel_values.shape[0]:
        raise ValueError(
            f"grids cover {sum(rows_per_image)} patches, pixel_values has {pixel_values.shape[0]}"
        )
    out, row, img = [], 0, 0
    for k in images_per_sample:
        n = sum(rows_per_image[img : img + k])
        out.append(pixel_values[row : row + n])
        row, img = row + n, img + k
    return out


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """A shuffled order in which each run of `batch_size` holds similar lengths (little padding): shuffle,
    cut into mega-batches of 50 batches, sort each by length, then shuffle the batches."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    mega = batch_size * 50
    batches = []
    for s in range(0, len(perm), mega):
        chunk = sorted(perm[s : s + mega], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in order for i in batches[b]]


def pack_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths` in bins of at most `budget` tokens each (a sequence longer
    than the budget gets a bin of its own; it cannot be split). Longest first, ties by index, each into the first
    bin it fits; deterministic, so every rank computes the same bins."""
    bins: list[list[int]] = []
    room: list[int] = []  # tokens left in each bin
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, r in enumerate(room) if lengths[i] <= r), None)
        if k is None:  # fits nowhere: a new bin (over budget only when the sequence alone is)
            bins.append([i])
            room.append(budget - lengths[i])
        else:
            bins[k].append(i)
            room[k] -= lengths[i]
    return bins


MAX_WIDEN = 1.25  # pack_rows' bound on a row's width (times the longest sequence) without varlen attention


def pack_rows(lengths: list[int], max_widen: float | None = None) -> list[list[int]]:
    """The rows a packed micro-batch runs as (policy.Policy.pack). `max_widen=None` (varlen attention: flash-attn's,
    or policy.varlen_sdpa_attention, the default on sdpa): one row of every sequence, in order, no padding.
    Otherwise (an attention that computes all W x W scores of a row, masked or not): first-fit decreasing into
    rows of width W, for the W between the longest sequence and `max_widen` times it (in steps of 1%) that
    computes the fewest token slots (rows x longest row; ties: the narrowest); the bound keeps a row's attention
    within max_widen^2 of a padded row's, while the wider rows take up what the narrowest layout leaves as
    padding in its rows."""
    if max_widen is None:
        return [list(range(len(lengths)))]
    longest = max(lengths)
    best, best_slots, width = None, 0, longest
    while width <= max_widen * longest:
        rows = pack_by_tokens(lengths, width)
        slots = _row_slots(rows, lengths)
        if best is None or slots < best_slots:
            best, best_slots = rows, slots
        width += max(1, width // 100)
    return best


def _row_slots(rows: list[list[int]], lengths: list[int]) -> int:
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def packed_slots(lengths: list[int], max_widen: float | None = None) -> int:
    """Token slots a packed micro-batch computes: its rows (`pack_rows`) times the longest of them."""
    return _row_slots(pack_rows(lengths, max_widen), lengths)


def deal_bins(loads: list[int], world: int) -> list[list[int]]:
    """Bin indices per rank: heaviest bin first onto the least loaded rank (by tokens) among those holding the
    fewest bins, so the counts differ by at most one (the short ranks run one zero-weight filler) and the token
    loads are balanced within that constraint. Deterministic."""
    per_rank: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for b in sorted(range(len(loads)), key=lambda b: (-loads[b], b)):
        fewest = min(len(p) for p in per_rank)
        r = min((r for r in range(world) if len(per_rank[r]) == fewest), key=lambda r: (load[r], r))
        per_rank[r].append(b)
        load[r] += loads[b]
    return per_rank


def packed_micro_batches(
    items: list[int], lengths: list[int], budget: int, world: int
) -> list[list[list[int]]]:
    """`items` (indices into `lengths`) packed by `pack_by_tokens` and dealt by `deal_bins`: per rank, its
    micro-batches (lists of items). Ranks may hold one micro-batch fewer than others; callers pad with fillers."""
    bins = [[items[j] for j in b] for b in pack_by_tokens([lengths[i] for i in items], budget)]
    per_rank = deal_bins([sum(lengths[i] for i in b) for b in bins], world)
    return [[bins[b] for b in p] for p in per_rank]


def padding_fraction(lengths: list[int]) -> float:
    """Share of a right-padded batch that is padding."""
    return 1.0 - sum(lengths) / (max(lengths) * len(lengths)) if lengths else 0.0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "synth":
        sys.exit("usage: python data.py synth --out_dir DIR [--seed S] [--mm_share F] [--key=value ...]")
    import synth

    synth.main(sys.argv[2:])
