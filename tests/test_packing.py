"""Padding-free micro-batches (issue 17): the packed forward against the padded one, the packed position ids
against each sequence computed alone, and the token-budget packer's invariants."""

import os

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

import data as D
import model as M

# The packed and padded forwards run the same sums in a different order (one (1, L) row against (B, T) rows):
# per-token log-probs agree to ~2e-7 relative and every parameter's gradient to ~1.3e-6 in norm (measured on
# the batch below); the bounds leave a margin of about 8x.
RTOL_LOGP, RTOL_GRAD = 1e-5, 1e-5


def _prompts(synth_dir, processor):
    """Three prompts with an image (different sizes of text) and one text-only prompt."""
    recs = D.load_records(os.path.join(synth_dir, "mm_train.jsonl"))[:3]
    text = D.Record(id="t", problem="What is 2 + 3?", answer="5")
    return [D.encode_prompt(r, processor) for r in recs] + [D.encode_prompt(text, processor)]


def _batch(synth_dir, processor, image_token_id, order=(0, 3, 1, 2, 3, 0), lengths=(3, 90, 1, 40, 7, 12)):
    """Sequences of very different lengths (1 to 90 completion tokens), images on some, a repeated image."""
    enc = _prompts(synth_dir, processor)
    g = torch.Generator().manual_seed(0)
    comps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]  # plain BPE ids of `tiny`
    return D.collate_sequences([enc[i] for i in order], comps, processor.tokenizer.pad_token_id, image_token_id)


def _logp_and_grads(policy, batch):
    policy.model.zero_grad()
    logp, ent = policy(batch["input_ids"], batch["attention_mask"], batch["target_mask"], batch["pixel_values"],
                       batch["image_grid_thw"], batch["mm_token_type_ids"], with_entropy=True)  # fmt: skip
    (logp.sum() + 0.3 * ent.sum()).backward()
    return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}


def test_packed_positions_are_each_sequence_alone(tiny, synth_dir):
    """Row 0 restarts at 0 per sequence; rows 1-3 are the M-RoPE positions of the sequence run on its own
    (no padding, batch of one), and transformers reads one packed sequence per input row from row 0."""
    model, processor = tiny
    batch = _batch(synth_dir, processor, model.config.image_token_id)
    has = batch["image_grid_thw"]
    pos = M.position_ids_for(model, batch["input_ids"], batch["attention_mask"], has, batch["mm_token_type_ids"])
    ids, packed, keep = M.pack_sequences(batch["input_ids"], batch["attention_mask"], pos)
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert ids.shape == (1, sum(lengths)) and packed.shape == (4, 1, sum(lengths))
    grids = iter(batch["image_grid_thw"])
    start = 0
    for b, n in enumerate(lengths):
        alone = batch["input_ids"][b, :n][None]
        n_img = int((alone == model.config.vision_start_token_id).sum())
        grid = torch.stack([next(grids) for _ in range(n_img)]) if n_img else None
        ref = M.position_ids_for(model, alone, torch.ones_like(alone), grid, (alone == model.config.image_token_id).int())
        assert torch.equal(ids[0, start : start + n], alone[0])
        assert torch.equal(packed[0, 0, start : start + n], torch.arange(n))
        assert torch.equal(packed[1:, 0, start : start + n], ref[:, 0])
        start += n
    seq_of = find_packed_sequence_indices(packed[0])  # what transformers builds the block-diagonal mask from
    assert torch.equal(seq_of[0], torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))


@pytest.mark.parametrize("dedupe", [False, True])
def test_packed_forward_matches_padded(synth_dir, dedupe):
    """Per-token log-probs, entropies and every gradient of the packed forward equal the padded forward's
    (images, six sequences in one row, 1 to 90 completion tokens)."""
    model, processor = M.load_model("tiny", seed=0)
    policy = M.Policy(model)
    policy.dedupe_images = dedupe
    batch = _batch(synth_dir, processor, model.config.image_token_id)
    padded = _logp_and_grads(policy, batch)
    policy.pack = True
    packed = _logp_and_grads(policy, batch)
    sel = batch["target_mask"].clone()
    sel[:, 0] = False
    assert torch.equal(packed[0] != 0, sel) and torch.equal(padded[0] != 0, sel)
    assert torch.allclose(packed[0], padded[0], rtol=RTOL_LOGP, atol=0)
    assert torch.allclose(packed[1], padded[1], rtol=RTOL_LOGP, atol=1e-6)
    assert packed[2].keys() == padded[2].keys() and len(padded[2]) == len(list(model.parameters()))
    for k, g in padded[2].items():
        assert (packed[2][k] - g).norm() <= RTOL_GRAD * g.norm(), k


def test_packing_without_restarting_positions_leaks_across_sequences(tiny, synth_dir):
    """The control: the same packed row with positions that do NOT restart (one long sequence to transformers)
    lets later sequences attend to earlier ones, and their log-probs change. The exactness above is the mask's
    doing, not an accident of the data."""
    model, processor = tiny
    batch = _batch(synth_dir, processor, model.config.image_token_id)
    pos = M.position_ids_for(model, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                             batch["mm_token_type_ids"])  # fmt: skip
    ids, packed, keep = M.pack_sequences(batch["input_ids"], batch["attention_mask"], pos)
    run = dict(input_ids=ids, attention_mask=None, pixel_values=batch["pixel_values"],
               image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"][keep][None],
               use_cache=False)  # fmt: skip
    with torch.no_grad():
        good = model.model(position_ids=packed, **run).last_hidden_state
        leaky = packed.clone()
        leaky[0] = torch.arange(ids.shape[1])
        bad = model.model(position_ids=leaky, **run).last_hidden_state
    first = int(batch["attention_mask"][0].sum())
    assert torch.equal(good[0, :first], bad[0, :first])  # the first sequence sees nothing else either way
    assert (good[0, first:] - bad[0, first:]).abs().max() > 1e-3
