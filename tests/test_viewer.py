"""viewer.py: the rollout page of a real (short) GRPO run shows every rollout of a step with its image and its
numbers; model text is escaped; the page stays bounded for a paper-scale rollouts.jsonl."""

import html
import json
import os
import random
import re

import pytest

import viewer as V


def _section(page: str, step: int) -> str:
    m = re.search(rf"<section class='step' id='step-{step}'.*?</section>", page, re.S)
    assert m, f"step {step} not on the page"
    return m.group(0)


def _cards(section: str) -> list[str]:
    return re.findall(r'<div class="card .*?</pre>', section, re.S)


@pytest.mark.slow
def test_page_of_a_real_run_shows_every_rollout_image_and_number(synth_dir, tmp_path):
    import data as D
    import grpo_mm as G

    out = str(tmp_path / "run")
    data, eval_data = os.path.join(synth_dir, "mm_train.jsonl"), os.path.join(synth_dir, "mm_test.jsonl")
    sizes = dict(max_steps=2, rollout_batch=4, group_size=4, max_new_tokens=16, mini_batch=16, micro_batch=16)
    cfg = G.GRPOConfig(
        model="tiny", data=data, out_dir=out, **sizes, save_every=0, eval_data=eval_data, eval_limit=8
    )
    G.train(cfg)
    path = V.main([out])  # data and group size come from final/revisual.json
    assert path == os.path.join(out, "rollouts.html")
    page = open(path, encoding="utf-8").read()
    with open(os.path.join(out, "rollouts.jsonl")) as f:
        rows = [json.loads(line) for line in f if json.loads(line)["step"] == 2]
    assert len(rows) == 16
    records = {r.id: r for r in D.load_records(os.path.join(synth_dir, "mm_train.jsonl"))}
    section = _section(page, 2)
    cards = _cards(section)
    assert len(cards) == len(rows)  # every rollout of the step, in the file's order
    for row, card in zip(rows, cards):
        assert f"<pre>{V.esc(row['completion'])}</pre>" in card
        for key in ("reward", "acc", "format", "len_reward"):
            assert f"<th>{key}</th><td>{row[key]:.3f}</td>" in card
        adv = f"{row['advantage']:+.3f}"
        want = rf"<th>advantage</th><td><span class='(pos|neg|zero)'>{re.escape(adv)}</span></td>"
        assert re.search(want, card)
        assert f"<th>times_drawn</th><td>{row['times_drawn']}</td>" in card
        assert f"<th>tokens</th><td>{row['num_tokens']}</td>" in card
        assert ("kept x" in card) == row["kept"] and ("dropped" in card) == (not row["kept"])
    for pid in {r["prompt_id"] for r in rows}:  # each prompt with its own image and problem text
        match = re.search(rf"<div class='group' data-prompt='{pid}'>.*?<div class='comps'>", section, re.S)
        group = match.group(0)
        rec = records[pid]
        assert rec.images and f'src="{V.thumbnail_uri(rec.images[0], 192, {})}"' in group
        assert V.esc(rec.problem) in group and V.esc(rec.answer) in group
    # the curves, held-out accuracy (logged at the last step) included, and the step picker
    for _, title in V.CURVES:
        assert V.esc(title) in page
    assert page.count("<svg") == len(V.CURVES) and "(not logged)" not in page
    assert "<option>step 1</option><option>step 2</option>" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network


def _rollout_row(step: int, pid: str, text: str, k: int, n: int) -> dict:
    row = {"step": step, "prompt_id": pid, "completion": text, "num_tokens": 2000, "truncated": False}
    row |= {"reward": k / n, "acc": float(k % 2), "format": 1.0, "len_reward": 1.0, "advantage": k / n - 0.5}
    return row | {"kept": k % 3 == 0, "times_drawn": int(k % 3 == 0)}


def _write_run(root: str, steps: int, groups: int, n: int, chars: int, n_images: int, img_px: int) -> str:
    """A GRPO out_dir without training: rollouts.jsonl, metrics.jsonl, final/revisual.json and a data file."""
    from PIL import Image

    rng = random.Random(0)
    data_dir = os.path.join(root, "data")
    os.makedirs(os.path.join(data_dir, "img"))
    for i in range(n_images):  # noise: the worst case for the thumbnails' size
        noise = Image.frombytes("RGB", (img_px, img_px), rng.randbytes(img_px * img_px * 3))
        noise.save(f"{data_dir}/img/{i}.png")
    n_prompts = 4 * groups
    with open(os.path.join(data_dir, "train.jsonl"), "w") as f:
        for p in range(n_prompts):
            problem = f"What is {p} + 1? <b>bold</b>"
            record = dict(id=f"p{p}", problem=problem, answer=str(p + 1), images=[f"img/{p % n_images}.png"])
            f.write(json.dumps(record) + "\n")
    run = os.path.join(root, "run")
    os.makedirs(os.path.join(run, "final"))
    with open(os.path.join(run, "final", "revisual.json"), "w") as f:
        config = {"data": os.path.join(data_dir, "train.jsonl"), "group_size": n, "stage": "grpo_mm"}
        json.dump({"config": config}, f)
    text = ("<think>& so " * (chars // 12 + 1))[:chars]
    with (
        open(os.path.join(run, "rollouts.jsonl"), "w") as f,
        open(os.path.join(run, "metrics.jsonl"), "w") as m,
    ):
        for s in range(1, steps + 1):
            metrics = dict(step=s, reward=0.5, acc=0.4, zero_adv_frac=0.5, pad_kept=9, resp_len=60.0)
            m.write(json.dumps(metrics | ({"val_acc": 0.3} if s % 50 == 0 else {})) + "\n")
            for g in range(groups):
                pid = f"p{(s * groups + g) % n_prompts}"
                for k in range(n):
                    f.write(json.dumps(_rollout_row(s, pid, text, k, n)) + "\n")
    return run


def test_page_size_is_bounded_for_a_paper_scale_run(tmp_path):
    """200 steps x 16 groups x 8 rollouts of 2,000 characters, noise images (a 56 MB rollouts.jsonl; a paper run's
    4,096 rows a step only make more groups to skip: what is embedded depends on K, G and the group size alone)."""
    run = _write_run(str(tmp_path), steps=200, groups=16, n=8, chars=2000, n_images=40, img_px=600)
    cfg = V.ViewerConfig(run_dir=run)
    page = open(V.build(cfg), encoding="utf-8").read()
    size = len(page.encode())
    assert size <= V.max_bytes(cfg, group_size=8, images_per_prompt=1)
    assert size < 8e6, size
    steps = [int(s) for s in re.findall(r"<section class='step' id='step-(\d+)'", page)]
    assert len(steps) == cfg.steps and steps[0] == 1 and steps[-1] == 200  # evenly spaced, first and last
    for s in steps:
        section = _section(page, s)
        assert section.count("<div class='group'") == cfg.groups and len(_cards(section)) == cfg.groups * 8
        assert "16 groups; showing 8 groups (evenly spaced)" in section
    assert f"Showing {cfg.steps} of 200 steps" in page and "cut for the page" in page


def test_model_text_is_escaped(tmp_path):
    run = _write_run(str(tmp_path), steps=2, groups=2, n=2, chars=10, n_images=1, img_px=8)
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>\x07'
    rows = [json.loads(line) for line in open(os.path.join(run, "rollouts.jsonl"))]
    rows[-1]["completion"] = evil
    rows[-1]["prompt_id"] = rows[-2]["prompt_id"] = "p1'><script>"
    with open(os.path.join(run, "rollouts.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    # the steps then come from rollouts.jsonl, the curves are empty
    os.remove(os.path.join(run, "metrics.jsonl"))
    page = open(V.build(V.ViewerConfig(run_dir=run)), encoding="utf-8").read()
    assert "<option>step 1</option><option>step 2</option>" in page
    assert page.count("(not logged)") == len(V.CURVES)
    assert page.count("<script") == 1  # ours only
    assert "onerror=alert(1)>" not in page and "<img src=x" not in page
    assert html.escape('<script>alert("x")</script>', quote=True) in page
    assert "\u2407" in page and "\x07" not in page  # a control character shown as its picture
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "prompt p1&#x27;&gt;&lt;script&gt; not in the data file" in page
