"""model.py: offline builds, chunked log-probs (values, gradients, memory rule), generate agreement, save/load."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data as D
import model as M
import policy as P
from conftest import ROOT, make_image

# Policy's positional inputs, in its order.
POLICY_INPUTS = "input_ids attention_mask target_mask pixel_values image_grid_thw mm_token_type_ids".split()


def test_tiny_builds_offline_small_and_deterministic(tiny):
    m, p = tiny
    n = M.count_parameters(m)
    assert n < 2_000_000, n
    m2, _ = M.build_tiny("tiny", seed=0)
    m3, _ = M.build_tiny("tiny", seed=1)
    sd, sd2, sd3 = m.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd3[k]) for k in sd)
    # special tokens sit right after the BPE vocabulary, in Qwen2's order
    ids = [p.tokenizer.convert_tokens_to_ids(t) for t in M.SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 22))
    assert m.config.image_token_id == p.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_tiny_qwen_reproduces_real_qwen2_ids(tiny_qwen):
    _, p = tiny_qwen
    tok = p.tokenizer
    # Reference ids of the real Qwen2 tokenizer (tokenizer.json of Qwen2.5-VL-7B-Instruct).
    assert tok("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    assert tok("12", add_special_tokens=False).input_ids == [16, 17]  # digits one by one
    specials = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
        "<|file_sep|>": 151664,
    }
    for t, i in specials.items():
        assert tok.convert_tokens_to_ids(t) == i
    assert tok.decode([9707, 1879]) == "Hello world"


def test_trap_generation_config_shipped(tiny):
    gc = tiny[0].generation_config
    assert gc.top_k == 1 and gc.repetition_penalty == 1.05 and gc.do_sample


@pytest.mark.parametrize("temperature,with_entropy", [(1.0, False), (0.7, True)])
def test_chunked_logprobs_match_log_softmax_values_and_grads(temperature, with_entropy):
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 301
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    coef = torch.randn(n, generator=g)  # an arbitrary loss on the outputs, so the gradient is not trivial
    coef_e = torch.randn(n, generator=g)

    logp, ent = P.token_logprobs(
        hidden, weight, targets, temperature, chunk_size=8, with_entropy=with_entropy
    )
    loss = (coef * logp).sum() + ((coef_e * ent).sum() if with_entropy else 0)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))

    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    full = F.log_softmax(h2 @ w2.T / temperature, dim=-1)  # the whole (N, V) at once
    ref_logp = full.gather(1, targets[:, None]).squeeze(1)
    ref_ent = -(full.exp() * full).sum(-1)
    ref_loss = (coef * ref_logp).sum() + ((coef_e * ref_ent).sum() if with_entropy else 0)
    rh, rw = torch.autograd.grad(ref_loss, (h2, w2))

    assert torch.allclose(logp, ref_logp, atol=1e-5)
    if with_entropy:
        assert torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.allclose(gh, rh, atol=1e-5)
    assert torch.allclose(gw, rw, atol=1e-5)


def test_chunked_logprobs_never_hold_full_logits():
    """Count the largest fp32 tensor created inside forward + backward: it is a (chunk x V) block, never N x V."""
    n, h, v, chunk = 64, 8, 1000, 16
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    largest = [0]

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                largest[0] = max(largest[0], out.numel())
            return out

    with Spy():
        logp, _ = P.token_logprobs(hidden, weight, targets, 1.0, chunk_size=chunk, with_entropy=True)
        logp.sum().backward()
    assert largest[0] <= max(chunk * v, v * h), largest[0]
    assert largest[0] < n * v


def _image_records(tmp_path):
    a = make_image(str(tmp_path / "a.png"), (56, 56), "red")
    b = make_image(str(tmp_path / "b.png"), (84, 56), "blue")
    return [
        D.Record(id="1", problem="How many shapes are there?", answer="3", images=[a], source="t:1"),
        D.Record(
            id="2", problem="Add the numbers shown in both pictures.", answer="5", images=[a, b], source="t:2"
        ),
    ]


def test_policy_logprobs_equal_generate_logits_for_image_prompts(tiny, tmp_path):
    m, p = tiny
    prompts = [D.encode_prompt(r, p) for r in _image_records(tmp_path)]
    batch = D.collate_prompts(prompts, p.tokenizer.pad_token_id, m.config.image_token_id)
    torch.manual_seed(0)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    scores = dict(output_logits=True, return_dict_in_generate=True)
    out = m.generate(**batch, max_new_tokens=6, min_new_tokens=6, **sampling, **scores)
    width = batch["input_ids"].shape[1]
    new = out.sequences[:, width:]
    gen_logps = torch.stack([F.log_softmax(lg.float(), -1) for lg in out.logits], 1)
    gen_logp = gen_logps.gather(2, new[..., None])[..., 0]

    seqs = D.collate_sequences(prompts, new.tolist(), p.tokenizer.pad_token_id, m.config.image_token_id)
    policy = P.Policy(m, chunk_size=5)
    with torch.no_grad():
        logp, _ = policy(*(seqs[k] for k in POLICY_INPUTS))
    ours = torch.stack([logp[i][seqs["target_mask"][i]] for i in range(2)])
    assert torch.allclose(ours, gen_logp, atol=1e-4), (ours - gen_logp).abs().max()
    # Without mm_token_type_ids the 3-D positions are lost and the numbers change (PITFALLS).
    keys = ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")
    pos = P.position_ids_for(m, *(seqs[k] for k in keys))
    assert not torch.equal(pos[1], pos[0])


def test_shared_prefix_keys_on_the_images_too(tiny, tmp_path):
    """Two records with the same question and the same image size but different pixels have identical prompt
    ids (<|image_pad|> is one id for every image). In a GRPO batch sharing prefixes, each row's log-probs must
    still be its own: equal to the row computed alone, to 1e-5."""
    m, p = tiny
    from PIL import Image, ImageDraw

    recs = []
    for k, (color, box) in enumerate((("red", (4, 4, 30, 30)), ("blue", (20, 24, 52, 50)))):
        im = Image.new("RGB", (56, 56), "white")
        ImageDraw.Draw(im).ellipse(box, fill=color)
        im.save(tmp_path / f"{k}.png")
        image = str(tmp_path / f"{k}.png")
        recs.append(
            D.Record(
                id=str(k), problem="Add the two numbers shown.", answer="3", images=[image], source=f"t:{k}"
            )
        )
    enc = [D.encode_prompt(r, p) for r in recs]
    assert enc[0].input_ids == enc[1].input_ids and not torch.equal(enc[0].pixel_values, enc[1].pixel_values)
    # two groups of two samples (prompt, completion), as a GRPO micro-batch holds them
    rows = [(0, [5, 6, 7, 8]), (0, [5, 6, 7]), (1, [9, 8, 7, 6]), (1, [9, 8])]

    def logprobs(policy, rows):
        prompts, comps = [enc[i] for i, _ in rows], [c for _, c in rows]
        b = D.collate_sequences(prompts, comps, p.tokenizer.pad_token_id, m.config.image_token_id)
        with torch.no_grad():
            logp, _ = policy(*(b[k] for k in POLICY_INPUTS))
        return [logp[j][b["target_mask"][j]] for j in range(len(rows))]

    alone = [logprobs(P.Policy(m), [row])[0] for row in rows]
    # the premise: the image changes the numbers, so a key without it would score row 2 on row 0's image
    other_image = logprobs(P.Policy(m), [(0, rows[2][1])])[0]
    assert (other_image - alone[2]).abs().max() > 1e-3
    shared = P.Policy(m)
    shared.share_prefix = shared.dedupe_images = True
    for i, got in enumerate(logprobs(shared, rows)):
        assert torch.allclose(got, alone[i], atol=1e-5), (i, (got - alone[i]).abs().max())


def test_policy_gradient_matches_unchunked_full_logits(tiny, tmp_path):
    m, p = tiny
    m = M.build_tiny("tiny", seed=0)[0]
    text = D.Record(id="3", problem="What is 2 plus 3?", answer="5", source="t:3")
    recs = _image_records(tmp_path) + [text]
    prompts = [D.encode_prompt(r, p) for r in recs]
    comps = [D.encode_completion("<think>2 + 3 = 5.</think> \\boxed{5}", p.tokenizer) for _ in recs]
    b = D.collate_sequences(prompts, comps, p.tokenizer.pad_token_id, m.config.image_token_id)
    policy = P.Policy(m, chunk_size=7)
    logp, ent = policy(*(b[k] for k in POLICY_INPUTS), temperature=0.9, with_entropy=True)
    loss = -(logp.sum() + 0.1 * ent.sum())
    loss.backward()
    g1 = {k: v.grad.clone() for k, v in m.named_parameters() if v.grad is not None}
    m.zero_grad()
    # reference: the model's own full logits through log_softmax
    inputs = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    logits = m(**{k: b[k] for k in inputs}).logits
    full = F.log_softmax(logits[:, :-1].float() / 0.9, -1)
    tl = full.gather(2, b["input_ids"][:, 1:, None])[..., 0]
    te = -(full.exp() * full).sum(-1)
    mask = b["target_mask"][:, 1:]
    ref_loss = -((tl * mask).sum() + 0.1 * (te * mask).sum())
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    ref_loss.backward()
    for k, v in m.named_parameters():
        if k in g1:
            assert torch.allclose(g1[k], v.grad, atol=1e-5), k


def test_save_and_load_roundtrip(tiny, tmp_path):
    m, p = tiny
    out = str(tmp_path / "final")
    M.save_model(m, p, out, metadata={"prompt": D.REASONING_PROMPT, "placement": "system"})
    assert not os.path.exists(out + ".tmp")
    m2, p2 = M.load_model(out)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert p2.tokenizer("What is 3 plus 4?").input_ids == p.tokenizer("What is 3 plus 4?").input_ids
    assert p2.image_processor.merge_size == 2
    assert M.read_training_metadata(out)["placement"] == "system"
    generation_config = json.load(open(os.path.join(out, "generation_config.json")))
    assert generation_config["top_k"] == 1  # the trap travels along


def test_generate_offline_from_image_prompt_in_fresh_process(tmp_path):
    """Acceptance: with HF_HUB_OFFLINE=1 and no network, both built-in models take an image prompt and generate."""
    img = make_image(str(tmp_path / "x.png"))
    code = f"""
import torch, model as M, data as D
for kind in ("tiny", "tiny-qwen"):
    m, p = M.load_model(kind)
    e = D.encode_prompt(D.Record(id="a", problem="How many?", answer="1", images=[{img!r}]), p)
    b = D.collate_prompts([e], p.tokenizer.pad_token_id, m.config.image_token_id)
    out = m.generate(**b, max_new_tokens=4, min_new_tokens=4, do_sample=False, top_k=None, top_p=None,
                     temperature=None, repetition_penalty=1.0)
    assert out.shape[1] == len(e.input_ids) + 4
    print(kind, "ok")
"""
    offline = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    no_network = dict(no_proxy="*", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    env = dict(os.environ, **offline, **no_network)
    cmd = [sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny ok" in r.stdout and "tiny-qwen ok" in r.stdout
