"""engine.py: the continuous-batching decode engine against HF `generate` (greedy, row by row), against today's
decode loop (sampling, same draws when nothing finishes early), independence of slots and neighbours, and a
memory bound measured on every tensor the engine allocates."""

import os
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LogitsProcessor, LogitsProcessorList

import data as D
import engine as E
import sampling as S


def _prompts(synth_dir, processor, k=3):
    recs = D.load_records(os.path.join(synth_dir, "mm_train.jsonl"))[:k]
    enc = [D.encode_prompt(r, processor) for r in recs]
    text = D.Record(id="t", problem="What is 2 + 3?", answer="5")
    return enc + [D.encode_prompt(text, processor)]  # different lengths: left padding; one without an image


def _collate(model, processor, prompts):
    return D.collate_prompts(prompts, processor.tokenizer.pad_token_id, model.config.image_token_id)


class Steer(LogitsProcessor):
    """The same per-(sequence, step) logits change for HF generate (as a LogitsProcessor) and the engine (as its
    logits_hook): a fixed random bias of the size of the tiny model's own logit spread, so that greedy rows differ
    by prompt, sample and step while the model still decides, and a forced end of turn at a per-sequence step, so
    that rows end at different steps."""

    def __init__(
        self, num_seqs: int, max_new: int, vocab: int, lengths: list[int], end_id: int, width: int = 0
    ):
        g = torch.Generator().manual_seed(0)
        self.bias = torch.randn(num_seqs, max_new, vocab, generator=g) * 0.2
        self.lengths, self.end_id, self.width = torch.tensor(lengths), end_id, width

    def hook(self, seq, step, logits):
        logits = logits + self.bias[seq, step, : logits.shape[1]]
        end = step >= self.lengths[seq] - 1
        logits[end, self.end_id] = float("inf")
        return logits

    def __call__(self, input_ids, scores):
        b = input_ids.shape[0]
        return self.hook(torch.arange(b), torch.full((b,), input_ids.shape[1] - self.width), scores)


def test_engine_greedy_matches_hf_row_by_row(tiny, synth_dir):
    """Images, left padding, groups, rows ending at different steps, slots refilled several times."""
    model, processor = tiny
    enc = _prompts(synth_dir, processor)
    n = 3
    repeated = _collate(model, processor, [e for e in enc for _ in range(n)])
    once = _collate(model, processor, enc)
    width = once["input_ids"].shape[1]
    gc = S.generation_config(processor.tokenizer, 0.0, 1.0, 12)
    lengths = [2 + (5 * i) % 11 for i in range(len(enc) * n)]
    steer = Steer(len(lengths), 12, model.config.text_config.vocab_size, lengths, gc.eos_token_id[0], width)
    ref = model.generate(**repeated, generation_config=gc, logits_processor=LogitsProcessorList([steer]))
    got = [len(S.split_completion(row, set(gc.eos_token_id))[0]) for row in ref[:, width:].tolist()]
    assert got == lengths
    new = ref[:, width:]
    assert not torch.equal(new[0], new[n]) and not torch.equal(new[0], new[1]), "rows must differ"
    # prefill_tokens: the default (one prefill per admission here), 1 (every prompt alone), two prompts' worth
    for slots, budget in (
        (0, E.PREFILL_TOKENS),
        (2, E.PREFILL_TOKENS),
        (5, E.PREFILL_TOKENS),
        (0, 1),
        (5, 2 * width),
    ):
        stats = {}
        out = E.generate(
            model,
            **once,
            generation_config=gc,
            num_return_sequences=n,
            slots=slots,
            logits_hook=steer.hook,
            stats=stats,
            prefill_tokens=budget,
        )
        assert torch.equal(out, ref), (slots, budget)
        assert stats["prefills"] == len(enc) and stats["admissions"] == len(enc) * n
    assert stats["slots"] == 5 and stats["admissions"] >= 2 * stats["slots"]
    # The steer must not decide alone: without the model's logits the tokens would differ.
    bias_only = torch.stack([steer.bias[s, : new.shape[1]].argmax(-1) for s in range(len(lengths))])
    assert not torch.equal(torch.where(new == gc.pad_token_id, bias_only, new), bias_only)
    plain = S.generation_config(processor.tokenizer, 0.0, 1.0, 12)
    # no hook; n = 1 on repeated prompts
    ours = E.generate(model, **repeated, generation_config=plain, slots=4)
    assert torch.equal(ours, model.generate(**repeated, generation_config=plain))


def test_engine_row_independent_of_slot_and_neighbours(tiny, synth_dir):
    model, processor = tiny
    enc = _prompts(synth_dir, processor)
    gc = S.generation_config(processor.tokenizer, 0.0, 1.0, 10)
    width = _collate(model, processor, enc)["input_ids"].shape[1]
    alone = [E.generate(model, **_collate(model, processor, [e]), generation_config=gc, slots=1) for e in enc]
    alone = [a[0, a.shape[1] - 10 :] for a in alone]
    order = [2, 0, 3, 1]
    for slots in (2, 3):
        out = E.generate(
            model,
            **_collate(model, processor, [enc[i] for i in order]),
            generation_config=gc,
            num_return_sequences=2,
            slots=slots,
        )[:, width:]
        for row, i in enumerate(j for j in order for _ in range(2)):
            assert torch.equal(out[row], alone[i]), (slots, row)


def test_engine_sampling_is_todays_sampler(tiny, synth_dir):
    """With every row alive to the end and one slot per row, the engine draws exactly what today's loop draws
    (the same sampler on the same logits, in the same order): the distribution of HF generate (test_bench)."""
    model, processor = tiny
    once = _collate(model, processor, _prompts(synth_dir, processor))
    gc = S.generation_config(processor.tokenizer, 1.0, 0.9, 8)
    gc.min_new_tokens = 8
    torch.manual_seed(3)
    ref = S.generate(model, **once, generation_config=gc, num_return_sequences=4)
    torch.manual_seed(3)
    out = E.generate(model, **once, generation_config=gc, num_return_sequences=4)
    assert torch.equal(out, ref)
    new = ref[:, once["input_ids"].shape[1] :]
    assert len({tuple(r) for r in new[:4].tolist()}) > 1
    # Fewer slots than rows: deterministic for the seed, suppressed ids never drawn, min_new_tokens honoured.
    gc.max_new_tokens = 12
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(E.generate(model, **once, generation_config=gc, num_return_sequences=4, slots=3))
    assert torch.equal(runs[0], runs[1])
    new = runs[0][:, once["input_ids"].shape[1] :]
    assert not bool(torch.isin(new, torch.tensor(S.vision_special_ids(processor.tokenizer))).any())
    assert not bool(torch.isin(new[:, :8], torch.tensor(gc.eos_token_id)).any())


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensors allocated by ops under the mode and still alive: current, peak, and a log of every
    allocation's size. Results that share storage with an input (views, in-place) allocate nothing; tensors made
    before the mode are not counted."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self.sizes: list[int] = []
        self._seen: set[int] = set()

    def _free(self, nbytes: int, ptr: int) -> None:
        self.current -= nbytes
        self._seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self._seen or ptr in inputs:  # a view, an in-place or out= result
                continue
            self._seen.add(ptr)
            self.sizes.append(nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._free, nbytes, ptr)
        return out


@pytest.mark.slow  # every op goes through the Python dispatch mode: about 20 s
def test_engine_memory_allocated_once_and_bounded(tiny, synth_dir):
    model, processor = tiny
    enc = _prompts(synth_dir, processor)
    gc = S.generation_config(processor.tokenizer, 0.0, 1.0, 8)
    peaks, outs = [], []
    for copies in (2, 4):  # 16 then 32 sequences through the same 4 slots
        batch = _collate(model, processor, enc * copies)
        stats = {}
        with LiveTensorBytes() as mem:
            out = E.generate(
                model, **batch, generation_config=gc, num_return_sequences=2, slots=4, stats=stats
            )
        tc = model.config.text_config
        layer_bytes = stats["kv_bytes"] // (2 * tc.num_hidden_layers)
        assert mem.sizes.count(layer_bytes) == 2 * tc.num_hidden_layers, "the KV buffers are allocated once"
        assert mem.peak >= stats["kv_bytes"]
        assert stats["admissions"] == len(enc) * copies * 2
        peaks.append(mem.peak)
        outs.append(out)
    # The only thing that grows with the number of sequences is the returned tensor (and the copies that build it).
    growth = 3 * (outs[1].numel() - outs[0].numel()) * 8
    assert peaks[1] <= peaks[0] + growth, (peaks, growth)


def test_prefill_parts_bound_the_padded_tokens():
    lengths = [5, 3, 8, 2, 9, 1]
    assert E.prefill_parts([0, 1, 2, 3, 4, 5], lengths, 16) == [[0, 1], [2, 3], [4], [5]]  # 2x5, 2x8, 9, 1
    assert E.prefill_parts([2, 4], lengths, 4) == [[2], [4]]  # longer than the budget: alone
    assert E.prefill_parts([0, 1, 3], lengths, 100) == [[0, 1, 3]]
    assert E.prefill_parts([], lengths, 16) == []
