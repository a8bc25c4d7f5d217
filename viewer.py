"""A rollout viewer: one self-contained static HTML page per GRPO run (no server, no network, no external JS).

    python viewer.py RUN_DIR [--data PATH] [--out FILE] [--steps K] [--groups G] [--max_chars C] [--thumb PX]

Reads RUN_DIR/rollouts.jsonl and RUN_DIR/metrics.jsonl (CONTRACT.md), the run's config from
RUN_DIR/final/revisual.json ("config": `data`, `group_size`, `stage`) and the prompts and images from the data
file (`--data` overrides the recorded path, e.g. when the run moved). Writes RUN_DIR/rollouts.html (or --out).

The page: the run's curves (reward, accuracy, zero-advantage fraction, PAD kept, response length, and held-out
accuracy at each evaluation), drawn as inline SVG; a step picker (a few lines of inline vanilla JS; without JS
every step is shown one after another); for each embedded step, each group's prompt with its image(s), gold
answer and reward spread (min / mean / max / std, correct count), and its completions side by side, each with
its reward parts (acc, format, len_reward, reward), advantage, kept or dropped by PAD, times drawn, length.

Paper scale (hundreds of steps x 4,096 rollouts) is handled by sampling, stated on the page:
  - at most `steps` (K) steps are embedded: evenly spaced over the run, the first and the last included;
  - at most `groups` (G) groups per embedded step, evenly spaced over the step's groups (all when fewer);
  - each completion's text is cut to `max_chars` characters (head and tail, the cut marked and counted);
  - images are embedded as base64 data URIs of thumbnails at most `thumb` pixels a side (PNG or JPEG, whichever
    is smaller), each image encoded once.
So the file size is bounded independently of the run's length: about K x G x group_size x (max_chars + 0.7 KB)
of rollouts plus K x G x (images per prompt) x (at most ~3 x thumb^2 bytes, far less in practice) of images,
plus the curves (at most 1,000 points each); with the defaults and 8 rollouts per group about 2-4 MB. The
rollouts file is streamed one step at a time, so memory holds one step's rows (texts already cut).
Every string from the model or the data (completions, prompts, ids, answers) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import common as C
from report import read_jsonl

CURVES = [
    ("reward", "reward"),
    ("acc", "train accuracy"),
    ("zero_adv_frac", "zero-advantage fraction"),
    ("pad_kept", "PAD kept (sequences)"),
    ("resp_len", "response length (tokens)"),
    ("val_acc", "held-out accuracy (per evaluation)"),
]
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_STEP = re.compile(r'\{"step": (\d+),')


@dataclass
class ViewerConfig:
    """python viewer.py RUN_DIR [--key=value ...]: RUN_DIR/rollouts.html from a GRPO run (see viewer.py)."""

    run_dir: str = ""  # a grpo_mm / grpo_text out_dir (also the first positional argument)
    data: str = ""  # the training data (prompts, images); "" = the path recorded in final/revisual.json
    out: str = ""  # "" = RUN_DIR/rollouts.html
    steps: int = 12  # at most K steps embedded: evenly spaced, first and last included
    groups: int = 8  # at most G groups per embedded step, evenly spaced over the step's groups
    group_size: int = 0  # 0 = the run's config (else consecutive rows with one prompt_id make a group)
    max_chars: int = 1500  # completion text kept per rollout (head and tail)
    thumb: int = 192  # image thumbnails: at most this many pixels a side


# ----------------------------------------------------------------------------------------------------------
# Reading: the run's config, the prompts, the selected steps' rows


def max_bytes(cfg: ViewerConfig, group_size: int, images_per_prompt: int = 1) -> int:
    """The page's size bound (the docstring's), for text that escaping at most doubles (a text made only of
    quotes would grow 6x): 100 KB of frame and curves, then per embedded group its prompt (cut to 2 x max_chars)
    and images (at most 4 x thumb^2 bytes each: base64 of raw RGB), and group_size cards."""
    card = 2 * cfg.max_chars + 1000
    group = 2000 + 4 * cfg.max_chars + images_per_prompt * 4 * cfg.thumb**2 + group_size * card
    return 100_000 + cfg.steps * (1000 + cfg.groups * group)


def run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "final", "revisual.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("config", {})


def pick_steps(steps: list[int], k: int) -> list[int]:
    """At most k of the steps, evenly spaced, the first and the last included."""
    if len(steps) <= k:
        return list(steps)
    if k <= 1:
        return steps[-1:]
    return sorted({steps[round(i * (len(steps) - 1) / (k - 1))] for i in range(k)})


def cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = max_chars * 2 // 3
    tail = max_chars - head
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[len(text) - tail :]}"


def stream_steps(path: str, wanted: set[int], max_chars: int) -> Iterator[tuple[int, list[dict]]]:
    """(step, its rows in file order) for each wanted step, one step at a time; texts cut to max_chars."""
    cur, rows = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _STEP.match(line)
            step = int(m.group(1)) if m else (json.loads(line).get("step") if line.strip() else None)
            if step not in wanted:
                continue
            row = json.loads(line)
            row["chars"] = len(row.get("completion", ""))
            row["cut"] = row["chars"] > max_chars
            row["completion"] = cut(row.get("completion", ""), max_chars)
            if step != cur and rows:
                yield cur, rows
                rows = []
            cur = step
            rows.append(row)
    if rows:
        yield cur, rows


def split_groups(rows: list[dict], group_size: int) -> list[list[dict]]:
    """Groups of group_size consecutive rows (one prompt each); consecutive runs of one prompt_id otherwise."""
    if group_size > 0 and len(rows) % group_size == 0:
        groups = [rows[i : i + group_size] for i in range(0, len(rows), group_size)]
        if all(len({r["prompt_id"] for r in g}) == 1 for g in groups):
            return groups
    groups: list[list[dict]] = []
    for r in rows:
        if groups and groups[-1][0]["prompt_id"] == r["prompt_id"] and len(groups[-1]) != group_size:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def evenly(items: list, k: int) -> list:
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


# ----------------------------------------------------------------------------------------------------------
# Rendering


def esc(text: object) -> str:
    """HTML-escaped text (quotes too), C0 control characters shown as their control pictures (U+2400...)."""
    s = html.escape(str(text), quote=True)
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m.group())) if ord(m.group()) < 32 else "\u2421", s)


def thumbnail_uri(path: str, px: int, cache: dict[str, str]) -> str:
    if path in cache:
        return cache[path]
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((px, px))
        encoded = []
        encodings = (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 80}))
        for fmt, mime, kw in encodings:
            buf = io.BytesIO()
            im.save(buf, fmt, **kw)
            encoded.append((len(buf.getvalue()), mime, buf.getvalue()))
    _, mime, raw = min(encoded)
    cache[path] = f"data:{mime};base64,{base64.b64encode(raw).decode()}"
    return cache[path]


def fmt(x: object, signed: bool = False) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def render_card(r: dict) -> str:
    kept = r.get("kept", False)
    badge = f"kept x{r.get('times_drawn', 0)}" if kept else "dropped"
    tone = "pos" if r["advantage"] > 1e-6 else ("neg" if r["advantage"] < -1e-6 else "zero")
    nums = [
        ("reward", fmt(r["reward"])),
        ("acc", fmt(r["acc"])),
        ("format", fmt(r["format"])),
        ("len_reward", fmt(r["len_reward"])),
        ("advantage", f"<span class='{tone}'>{fmt(r['advantage'], signed=True)}</span>"),
        ("times_drawn", fmt(r.get("times_drawn", 0))),
        ("tokens", fmt(r.get("num_tokens"))),
        ("truncated", fmt(r.get("truncated"))),
    ]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in nums)
    cls = "card kept" if kept else "card dropped"
    note = f'<div class="note">{r["chars"]} characters, cut for the page</div>' if r.get("cut") else ""
    return (
        f'<div class="{cls}" data-reward="{fmt(r["reward"])}" data-advantage="{fmt(r["advantage"], True)}">'
        f'<div class="badge">{badge}</div><table>{table}</table><pre>{esc(r["completion"])}</pre>{note}</div>'
    )


def render_group(g: list[dict], record, cfg: ViewerConfig, cache: dict[str, str]) -> str:
    rewards = [r["reward"] for r in g]
    spread = (
        f"reward min {min(rewards):.3f} / mean {statistics.fmean(rewards):.3f} / max {max(rewards):.3f} / "
        f"std {statistics.stdev(rewards) if len(rewards) > 1 else 0.0:.3f}; correct {sum(r['acc'] > 0 for r in g)}"
        f" of {len(g)}; kept {sum(bool(r.get('kept')) for r in g)}"
    )
    same = max(rewards) - min(rewards) < 1e-9
    flat = " <span class='flat'>no signal: every reward equal</span>" if same else ""
    if record is None:
        prompt = f"<p class='missing'>prompt {esc(g[0]['prompt_id'])} not in the data file</p>"
    else:
        imgs = []
        for i, p in enumerate(record.images):
            try:
                imgs.append(
                    f'<img src="{thumbnail_uri(p, cfg.thumb, cache)}" alt="image {i + 1} of {esc(record.id)}" '
                    f'title="{esc(os.path.basename(p))}">'
                )
            except OSError:
                imgs.append(f"<span class='missing'>image not found: {esc(p)}</span>")
        prompt = (
            f"<div class='imgs'>{''.join(imgs)}</div><div class='problem'><pre>{esc(cut(record.problem, 2 * cfg.max_chars))}</pre>"
            f"<p>gold answer: <b>{esc(record.answer)}</b>"
            + (f"; choices: {esc(' | '.join(record.choices))}" if record.choices else "")
            + "</p></div>"
        )
    return (
        f"<div class='group' data-prompt='{esc(g[0]['prompt_id'])}'><h3>{esc(g[0]['prompt_id'])}</h3>"
        f"<div class='prompt'>{prompt}</div><p class='spread'>{spread}{flat}</p>"
        f"<div class='comps'>{''.join(render_card(r) for r in g)}</div></div>"
    )


def render_step(
    step: int,
    rows: list[dict],
    metrics: dict,
    records: dict,
    cfg: ViewerConfig,
    group_size: int,
    cache: dict[str, str],
) -> str:
    groups = split_groups(rows, group_size)
    shown = evenly(groups, cfg.groups)
    m = metrics.get(step, {})
    keys = ("reward", "acc", "zero_adv_frac", "pad_kept", "resp_len", "val_acc")
    head = ", ".join(f"{k} {fmt(m[k])}" for k in keys if k in m)
    return (
        f"<section class='step' id='step-{step}' data-step='{step}'><h2>step {step}</h2><p>{len(rows)} rollouts "
        f"in {len(groups)} groups; showing {len(shown)} groups{' (evenly spaced)' if len(shown) < len(groups) else ''}."
        f" Step means: {head}</p>{''.join(render_group(g, records.get(g[0]['prompt_id']), cfg, cache) for g in shown)}"
        "</section>"
    )


def svg_curve(
    title: str, pts: list[tuple[float, float]], marks: list[int], w: int = 330, h: int = 170
) -> str:
    """One panel: the curve (at most 1,000 points), y range labelled, grey ticks at the embedded steps."""
    pts = [(x, y) for x, y in pts if isinstance(y, (int, float)) and math.isfinite(y)]
    if not pts:
        return f"<figure class='curve'><figcaption>{esc(title)}</figcaption><p>(not logged)</p></figure>"
    pts = evenly(pts, 1000)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    L, R, T, B = 46, 8, 8, 22

    def sx(x: float) -> float:
        return L + (w - L - R) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def sy(y: float) -> float:
        return T + (h - T - B) * (1 - (y - y0) / (y1 - y0))

    inside = [s for s in marks if x0 <= s <= x1]
    ticks = "".join(
        f"<line x1='{sx(s):.1f}' x2='{sx(s):.1f}' y1='{T}' y2='{h - B}' class='mark'/>" for s in inside
    )
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    few = pts if len(pts) <= 60 else []  # dots only on a short curve
    dots = "".join(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5'/>" for x, y in few)
    return (
        f"<figure class='curve'><figcaption>{esc(title)}</figcaption><svg width='{w}' height='{h}' role='img'>"
        f"<rect x='{L}' y='{T}' width='{w - L - R}' height='{h - T - B}' class='frame'/>{ticks}"
        f"<polyline points='{line}' class='line'/>{dots}"
        f"<text x='{L - 4}' y='{T + 8}' text-anchor='end'>{y1:.3g}</text>"
        f"<text x='{L - 4}' y='{h - B}' text-anchor='end'>{y0:.3g}</text>"
        f"<text x='{L}' y='{h - 6}'>{x0:g}</text><text x='{w - R}' y='{h - 6}' text-anchor='end'>step {x1:g}</text>"
        "</svg></figure>"
    )


STYLE = """body{font:14px system-ui,sans-serif;margin:16px;color:#222}pre{white-space:pre-wrap;word-break:break-word;
margin:4px 0;font:12px ui-monospace,monospace}.curves{display:flex;flex-wrap:wrap;gap:8px}.curve{margin:0}
.curve svg text{font-size:10px;fill:#555}.frame{fill:none;stroke:#ccc}.line{fill:none;stroke:#1f77b4;stroke-width:1.5}
circle{fill:#1f77b4}.mark{stroke:#ddd}.nav{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd}
.group{border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:8px}.group h3{margin:0 0 4px;font-size:14px}
.prompt{display:flex;gap:12px}.imgs img{border:1px solid #ccc;margin-right:4px;image-rendering:pixelated}
.comps{display:flex;gap:8px;overflow-x:auto;padding-bottom:6px}.card{flex:0 0 230px;border:2px solid #bbb;
border-radius:6px;padding:6px;background:#fafafa}.card.kept{border-color:#2a9d3a}.card.dropped{opacity:.75;
border-style:dashed}.card table{font-size:12px;border-collapse:collapse}.card th{text-align:left;font-weight:normal;
color:#666;padding-right:8px}.kept .badge{color:#1a7f2e}.badge{font-weight:bold}
.pos{color:#1a7f2e}.neg{color:#b3261e}.flat{color:#b3261e}.missing{color:#b3261e}.note{color:#888;font-size:11px}.spread{color:#444}"""

SCRIPT = """(function(){var s=[].slice.call(document.querySelectorAll('section.step')),p=document.getElementById('pick');
if(!s.length)return;function show(i){i=Math.max(0,Math.min(s.length-1,i));s.forEach(function(x,j){x.hidden=j!==i});
p.selectedIndex=i;}
p.onchange=function(){show(p.selectedIndex)};document.getElementById('prev').onclick=function(){show(p.selectedIndex-1)};
document.getElementById('next').onclick=function(){show(p.selectedIndex+1)};
document.addEventListener('keydown',function(e){if(e.key==='ArrowLeft')show(p.selectedIndex-1);
if(e.key==='ArrowRight')show(p.selectedIndex+1)});
var h=location.hash.slice(1),k=s.map(function(x){return x.id}).indexOf(h);show(k>=0?k:s.length-1);})();"""


def build(cfg: ViewerConfig) -> str:
    """Write the page; returns its path."""
    rollouts = os.path.join(cfg.run_dir, "rollouts.jsonl")
    if not os.path.exists(rollouts):
        raise FileNotFoundError(
            f"{rollouts}: no rollouts.jsonl (is {cfg.run_dir} a grpo_mm / grpo_text out_dir?)"
        )
    run = run_config(cfg.run_dir)
    metrics = {r["step"]: r for r in read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))}
    all_steps = sorted(metrics) or sorted({s for s, _ in stream_steps(rollouts, _AnyStep(), 0)})
    chosen = pick_steps(all_steps, cfg.steps)
    data = cfg.data or run.get("data", "")
    records: dict = {}
    data_note = "no data file (pass --data): prompts and images not shown"
    if data:
        import data as D

        try:
            records = {r.id: r for r in D.load_records(data, check_images=False)}
            data_note = f"prompts and images from {data}"
        except D.DataError as e:
            data_note = f"data file unreadable ({e}): prompts and images not shown"
    group_size = cfg.group_size or int(run.get("group_size", 0) or 0)
    cache: dict[str, str] = {}
    shown, sections = [], []
    for step, rows in stream_steps(rollouts, set(chosen), cfg.max_chars):
        shown.append(step)
        sections.append(render_step(step, rows, metrics, records, cfg, group_size, cache))
    mrows = list(metrics.values())
    curves = "".join(
        svg_curve(title, [(r["step"], r.get(key)) for r in mrows], shown) for key, title in CURVES
    )
    options = "".join(f"<option>step {s}</option>" for s in shown)
    title = f"rollouts: {run.get('stage', 'GRPO')} run {os.path.abspath(cfg.run_dir)}"
    sampling = (
        f"Showing {len(shown)} of {len(all_steps)} steps (at most {cfg.steps}: evenly spaced, first and last "
        f"included), at most {cfg.groups} groups per step (evenly spaced over the step's groups), completions "
        f"cut to {cfg.max_chars} characters (head and tail). Images: embedded base64 thumbnails, at most "
        f"{cfg.thumb} px a side. {esc(data_note)}. Cards: solid green border = kept by PAD for the update "
        "(x times drawn), dashed = dropped."
    )
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1><p>{sampling}</p>"
        f"<h2>Curves</h2><div class='curves'>{curves}</div><div class='nav'><button id='prev'>&larr; prev</button> "
        f"<select id='pick'>{options}</select> <button id='next'>next &rarr;</button> (or the arrow keys; the page URL #step-N opens step N)</div>"
        f"{''.join(sections)}<script>{SCRIPT}</script></body></html>"
    )
    out = cfg.out or os.path.join(cfg.run_dir, "rollouts.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return out


class _AnyStep:
    """A set that contains every step (reading the steps from rollouts.jsonl when metrics.jsonl is missing)."""

    def __contains__(self, item: object) -> bool:
        return item is not None


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = [f"--run_dir={argv[0]}"] + argv[1:]
    cfg = C.parse_config(ViewerConfig, argv)
    if not cfg.run_dir:
        raise C.ConfigError("give the run's out_dir: python viewer.py RUN_DIR")
    out = build(cfg)
    print(f"rollout viewer: {out} ({os.path.getsize(out) / 1e6:.1f} MB)")
    return out


if __name__ == "__main__":
    try:
        main()
    except (C.ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
