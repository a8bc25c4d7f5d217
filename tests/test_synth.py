"""synth.py: determinism, held-out splits, record/image validity, the image matters, answer spread, CLI."""

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import synth

SMALL = dict(n_sft=120, n_sft_test=60, n_mm_train=120, n_text_train=120, n_mm_test=80, n_text_test=80)
VISION_TOKENS = tuple(
    "<image> <|image_pad|> <|vision_start|> <|vision_end|> <|video_pad|> <|vision_pad|>".split()
)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tree_bytes(root):
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_small")
    cfg = synth.SynthConfig(seed=0, **SMALL)
    counts = synth.write_synth(str(out), cfg)
    return str(out), cfg, counts


@pytest.fixture(scope="module")
def default_splits():
    return synth.build_splits(synth.SynthConfig())


def test_write_is_byte_identical_for_a_seed(small_dir, tmp_path):
    out, cfg, _ = small_dir
    synth.write_synth(str(tmp_path / "again"), cfg)
    first, again = tree_bytes(out), tree_bytes(tmp_path / "again")
    assert first.keys() == again.keys() and all(first[k] == again[k] for k in first)
    synth.write_synth(str(tmp_path / "other"), dataclasses.replace(cfg, seed=1))
    other = tree_bytes(tmp_path / "other")
    assert other["mm_test.jsonl"] != first["mm_test.jsonl"]


def test_records_images_and_ids_are_valid(small_dir):
    out, cfg, counts = small_dir
    assert counts == {
        "sft": 120,
        "sft_test": 60,
        "mm_train": 120,
        "text_train": 120,
        "mm_test": 80,
        "text_test": 80,
    }
    ids = []
    for split, n in counts.items():
        recs = read_jsonl(os.path.join(out, f"{split}.jsonl"))
        assert len(recs) == n
        for r in recs:
            ids.append(r["id"])
            assert set(r) <= {"id", "problem", "images", "answer", "choices", "solution"}
            assert isinstance(r["problem"], str) and r["problem"] and isinstance(r["answer"], str)
            assert not any(t in r["problem"] for t in VISION_TOKENS)
            assert ("solution" in r) == (split in ("sft", "sft_test"))
            assert len(r["images"]) <= 1 and (len(r["images"]) == 1 or not split.startswith("mm_"))
            if split.startswith("text_"):
                assert r["images"] == []
            for rel in r["images"]:
                assert not os.path.isabs(rel) and rel.startswith("images/") and ".." not in rel
                with Image.open(os.path.join(out, rel)) as im:
                    assert im.mode == "RGB" and im.size == (cfg.image_size, cfg.image_size)
            if "choices" in r:
                assert len(r["choices"]) == cfg.n_choices == len(set(r["choices"]))
                assert re.fullmatch(r"[A-Z]", r["answer"]) and ord(r["answer"]) - 65 < len(r["choices"])
            else:
                assert r["answer"].isdigit() and 0 <= int(r["answer"]) <= cfg.max_answer
    assert len(ids) == len(set(ids))


def test_records_match_the_scenes_they_were_built_from(small_dir):
    out, cfg, _ = small_dir
    splits = synth.build_splits(cfg)
    for split, items in splits.items():
        for r, it in zip(read_jsonl(os.path.join(out, f"{split}.jsonl")), items, strict=True):
            assert r["answer"] == it.answer and r["problem"] == synth.problem_text(it.question)
            if it.question.mc:
                assert r["choices"][ord(r["answer"]) - 65] == str(it.value)
            if it.scene is not None:
                with Image.open(os.path.join(out, r["images"][0])) as im:
                    assert im.tobytes() == synth.render_image(it.scene, cfg).tobytes()


def test_sft_solutions_are_short_think_then_boxed(small_dir):
    out, _, _ = small_dir
    for split in ("sft", "sft_test"):
        for r in read_jsonl(os.path.join(out, f"{split}.jsonl")):
            s = r["solution"]
            assert s.startswith("<think>") and s.count("</think>") == 1, s
            assert s.rstrip(".").endswith("\\boxed{" + r["answer"] + "}"), s
            assert 3 <= len(s.split()) <= 40, s


def test_no_problem_of_a_held_out_split_appears_elsewhere(small_dir, default_splits):
    # from the files: identity = problem text (open or multiple choice) + the image's bytes
    out, _, counts = small_dir
    ident = {}
    for split in counts:
        keys = set()
        for r in read_jsonl(os.path.join(out, f"{split}.jsonl")):
            img = b"".join(open(os.path.join(out, p), "rb").read() for p in r["images"])
            keys.add((r["problem"].removesuffix(synth.MC_SUFFIX), hashlib.sha1(img).hexdigest()))
        ident[split] = keys
    # from the scenes, at default sizes: identity = problem text + what the image shows
    keyed = {
        s: {synth.problem_key(it.question, it.scene) for it in items} for s, items in default_splits.items()
    }
    for ids in (ident, keyed):
        for held in ("mm_test", "text_test", "sft_test"):
            for other in ids:
                if other != held:
                    assert not ids[held] & ids[other], (held, other)
    for held in ("mm_test", "text_test", "sft_test"):  # and no problem repeats inside a held-out split
        assert len(keyed[held]) == len(default_splits[held])


def test_default_test_splits_are_large_and_answers_spread(default_splits):
    for split in ("mm_test", "text_test"):
        items = default_splits[split]
        assert len(items) >= 500
        counts = Counter(it.answer for it in items)
        uniform = len(items) / len(counts)
        assert max(counts.values()) <= 1.5 * uniform, (split, counts.most_common(3))
        for mc in (False, True):  # each kind of answer (numbers, letters) on its own too
            sub = Counter(it.answer for it in items if it.question.mc == mc)
            assert max(sub.values()) <= 1.5 * sum(sub.values()) / len(sub), (split, mc, sub.most_common(3))
        assert {it.answer for it in items if it.question.mc} == set("ABCD")


def test_the_image_matters(default_splits):
    cfg = synth.SynthConfig()
    rng = np.random.default_rng(123)
    items = default_splits["mm_test"]
    changed = 0
    for it in items:
        other = it.scene
        while other == it.scene:
            other = synth.random_scene(it.scene.kind, rng, cfg)
        changed += synth.solve(it.question, other) != synth.solve(it.question, it.scene)
    assert changed >= 0.8 * len(items), changed / len(items)
    a, b = items[0].scene, synth.random_scene(items[0].scene.kind, rng, cfg)
    if a != b:
        assert synth.render_image(a, cfg).tobytes() != synth.render_image(b, cfg).tobytes()


def test_mix_mm_share_and_difficulty():
    cfg = synth.SynthConfig(**SMALL, mm_share=0.25)
    splits = synth.build_splits(cfg)
    assert sum(it.scene is not None for it in splits["sft"]) == 30
    assert sum(it.scene is not None for it in splits["sft_test"]) == 15
    assert all(synth.SKILLS[it.question.skill][1] == "easy" for it in splits["sft"])
    for split in ("mm_train", "text_train", "mm_test", "text_test"):
        hard = sum(synth.SKILLS[it.question.skill][1] == "hard" for it in splits[split])
        assert hard > 0.6 * len(splits[split])
        assert sum(it.question.mc for it in splits[split]) == round(cfg.mc_share * len(splits[split]))
    text_only = synth.build_splits(dataclasses.replace(cfg, mm_share=0.0))
    assert all(it.scene is None for it in text_only["sft"] + text_only["sft_test"])
    # a separate hard share for the image records of the SFT splits; text records and RL/test splits keep theirs
    mixed = synth.build_splits(dataclasses.replace(cfg, sft_hard_share=0.4, sft_mm_hard_share=0.1))
    for split, n_mm, n_text in (("sft", 30, 90), ("sft_test", 15, 45)):
        items = mixed[split]
        hard = [synth.SKILLS[it.question.skill][1] == "hard" for it in items]
        assert sum(h for h, it in zip(hard, items) if it.scene is not None) == round(0.1 * n_mm)
        assert sum(h for h, it in zip(hard, items) if it.scene is None) == round(0.4 * n_text)
    assert mixed["mm_test"] == splits["mm_test"] and mixed["text_train"] == splits["text_train"]
    with pytest.raises(ValueError, match="sft_mm_hard_share"):
        synth.build_splits(dataclasses.replace(cfg, sft_mm_hard_share=1.5))


def test_render_sizes_and_config_checks():
    for size in (56, 84, 112):
        cfg = synth.SynthConfig(image_size=size)
        for kind in ("number", "pair", "shapes"):
            im = synth.render_image(synth.random_scene(kind, np.random.default_rng(0), cfg), cfg)
            assert im.mode == "RGB" and im.size == (size, size)
    with pytest.raises(ValueError, match="image_size"):
        synth.build_splits(synth.SynthConfig(image_size=60))


def test_cli_parses_overrides_and_names_unknown_keys(tmp_path, capsys):
    flags = "--seed 2 --n_sft=8 --mm_share 0.5 --n_sft_test=4 --n_mm_train=4 --n_text_train 4 --n_mm_test=4"
    synth.main(["--out_dir", str(tmp_path / "d"), *flags.split(), "--n_text_test=4", "--image_size=56"])
    recs = read_jsonl(tmp_path / "d" / "sft.jsonl")
    assert len(recs) == 8 and sum(bool(r["images"]) for r in recs) == 4
    with Image.open(tmp_path / "d" / recs[[bool(r["images"]) for r in recs].index(True)]["images"][0]) as im:
        assert im.size == (56, 56)
    with pytest.raises(SystemExit, match="bogus"):
        synth.main(["--out_dir", str(tmp_path / "e"), "--bogus=1"])
    with pytest.raises(SystemExit, match="seed"):
        synth.main(["--out_dir", str(tmp_path / "e"), "--seed=x"])
    with pytest.raises(SystemExit) as e:
        synth.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(synth.SynthCommand):  # the stages' help format (common.config_help)
        line = next(ln for ln in help_text.splitlines() if ln.startswith(f"  --{f.name} "))
        assert line.split()[1:4] == [f.type, "default", repr(f.default)] and f.metadata["help"] in line, line


def test_tokenizer_corpus_is_deterministic_and_covers_the_task():
    corpus = synth.tokenizer_corpus(300, seed=0)
    assert corpus == synth.tokenizer_corpus(300, seed=0) and len(corpus) == 300
    text = "\n".join(corpus)
    assert "\nA. " in text and "\\boxed{" in text and "<think>" in text and "image" in text and "plus" in text
    assert all(isinstance(t, str) and t for t in corpus)


def test_multiplication_skill():
    """t_mul, the easy single product that the two-step items build on: problem, answer and trace by hand,
    and every product in its space stays within max_answer."""
    q = synth.Question("t_mul", 2, (3, 6))
    assert synth.problem_text(q) == "Compute 3 * 6."
    assert synth.solve(q, None) == 18
    assert synth.solution_text(q, None) == "<think>3 * 6 = 18.</think> The answer is \\boxed{18}."
    assert synth.problem_text(synth.Question("t_mul", 0, (4, 5))) == "What is 4 times 5?"
    cfg = synth.SynthConfig()
    space = synth.enumerate_space("t_mul", cfg)
    assert {it.question.params for it in space} == {
        (a, b) for a in range(10) for b in range(10) if a * b <= 20
    }
    assert all(it.value <= cfg.max_answer for it in space)


def test_pair_digits_sit_in_the_outer_vision_token_columns():
    # At 84 px the merged vision tokens are 28-px columns. Each digit must lie wholly in an outer column and the
    # middle one hold only the grey divider (no ink), so no token mixes the two digits.
    cfg = synth.SynthConfig()
    img = np.asarray(synth.render_image(synth.Scene("pair", (8, 8)), cfg))  # 8 lights every segment
    ink = (img == np.array(synth.INK)).all(-1)
    assert ink[:, :28].any() and ink[:, 56:].any() and not ink[:, 28:56].any()
    assert (img[:, 28:56] == np.array(synth.RULE)).all(-1).any()
