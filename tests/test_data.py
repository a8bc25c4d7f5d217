"""data.py: record validation (one test per bad input), chat rendering, SFT/RL batches, pixel slicing."""

import json
import logging

import pytest
import torch

import data as D
from conftest import make_image


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


GOOD = {"id": "g", "problem": "What is 1 plus 2?", "answer": "3"}


@pytest.mark.parametrize(
    "row,field,needle",
    [
        ({"id": "a", "answer": "3"}, "problem", "is missing"),
        ({"id": "a", "problem": "p"}, "answer", "is missing"),
        ({"id": "a", "problem": "p", "answer": "   "}, "answer", "is empty"),
        ({"id": "a", "problem": 5, "answer": "3"}, "problem", "must be a string"),
        ({"id": "a", "problem": "p", "answer": 3}, "answer", "must be a string"),
        ({"id": "a", "problem": "p", "answer": "3", "choices": "A"}, "choices", "list of strings"),
        ({"id": "a", "problem": "p", "answer": "3", "images": "x.png"}, "images", "list of image paths"),
        ({"id": "a", "problem": "p", "answer": "3", "images": [""]}, "images", "list of image paths"),
        ({"id": "a", "problem": "look <|image_pad|>", "answer": "3"}, "problem", "vision special token"),
        ({"id": "a", "problem": "p", "answer": "3", "images": ["missing.png"]}, "images", "not found"),
        (
            {"id": "a", "problem": "p", "answer": "3", "images": ["/no/such/dir/q1.png"]},
            "images",
            "not found",
        ),
        ({"id": "a", "problem": "p", "answer": "3", "images": ["/etc/passwd"]}, "images", "cannot decode"),
        ({"id": "a", "problem": "p", "answer": "3", "images": ["corrupt.png"]}, "images", "cannot decode"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, row, field, needle):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    make_image(str(tmp_path.parent / "outside.png"))
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(D.DataError) as e:
        D.load_records(path)
    msg = str(e.value)
    assert f"{path}:2" in msg and f"'{field}'" in msg and needle in msg, msg


def test_image_paths_absolute_relative_to_the_file_or_to_image_dir(tmp_path):
    """Absolute paths (LLaMA-Factory / EasyR1 style data), paths relative to the JSONL file (also `..`), and
    `image_dir` for datasets that keep their images elsewhere."""
    data, elsewhere = tmp_path / "data", tmp_path / "images"
    data.mkdir()
    elsewhere.mkdir()
    beside = make_image(str(tmp_path / "beside.png"), color="blue")
    far = make_image(str(elsewhere / "q1.png"), color="green")
    rows = [dict(GOOD, id="abs", images=[far]), dict(GOOD, id="up", images=["../beside.png"])]
    recs = D.load_records(write_jsonl(data / "d.jsonl", rows))
    assert [r.images for r in recs] == [[far], [beside]]
    recs = D.load_records(
        write_jsonl(data / "e.jsonl", [dict(GOOD, images=["q1.png"])]), image_dir=str(elsewhere)
    )
    assert recs[0].images == [far]
    with pytest.raises(D.DataError, match=r"e.jsonl:1: field 'images': image file not found"):
        D.load_records(str(data / "e.jsonl"))  # without image_dir: looked for beside the file


def test_invalid_json_and_missing_solution_and_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{not json"])
    with pytest.raises(D.DataError, match=r"d.jsonl:2: not valid JSON"):
        D.load_records(path)
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD])
    with pytest.raises(D.DataError, match=r"s.jsonl:1: field 'solution' is missing"):
        D.load_records(path, require_solution=True)
    path = write_jsonl(tmp_path / "dup.jsonl", [GOOD, GOOD])
    with pytest.raises(D.DataError, match=r"field 'id': 'g' appears more than once"):
        D.load_records(path)


def test_skip_bad_counts_and_warns(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"id": "b"}, "{x", dict(GOOD, id="c")])
    with caplog.at_level(logging.WARNING, logger="data"):
        recs = D.load_records(path, skip_bad=True)
    assert [r.id for r in recs] == ["g", "c"]
    assert (
        "skipped 2 bad record(s)" in caplog.text and "d.jsonl:2" in caplog.text and "d.jsonl:3" in caplog.text
    )


def test_prompt_over_max_len_is_named(tiny, tmp_path):
    _, p = tiny
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, dict(GOOD, id="long", problem="seven " * 400)])
    recs = D.load_records(path)
    with pytest.raises(
        D.DataError, match=r"d.jsonl:2: field 'problem': prompt is \d+ tokens, over max_prompt_len 300"
    ):
        D.encode_all(recs, p, max_prompt_len=300)
    assert len(D.encode_all(recs, p, max_prompt_len=300, skip_bad=True)) == 1


def test_messages_placement_and_choices():
    r = D.Record(id="1", problem="Pick one.", answer="B", images=["/x.png"], choices=["3", "4"])
    sys_msgs = D.build_messages(r, placement="system")
    assert sys_msgs[0] == {"role": "system", "content": D.REASONING_PROMPT}
    assert sys_msgs[1]["content"][0] == {"type": "image"}
    assert sys_msgs[1]["content"][1]["text"] == "Pick one.\nA. 3\nB. 4"
    user_msgs = D.build_messages(r, placement="user")
    assert len(user_msgs) == 1 and user_msgs[0]["content"][1]["text"].endswith(D.REASONING_PROMPT)
    with pytest.raises(ValueError):
        D.build_messages(r, placement="middle")


def test_image_token_count_matches_grid(tiny, tmp_path):
    _, p = tiny
    img = make_image(str(tmp_path / "a.png"), (112, 84))
    e = D.encode_prompt(D.Record(id="1", problem="q", answer="1", images=[img, img]), p)
    pad = p.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 112 x 84 px -> 8 x 6 patches of 14 px -> 2 x 2 merge -> 12 tokens per image
    assert e.image_grid_thw.tolist() == [[1, 6, 8], [1, 6, 8]]
    assert e.input_ids.count(pad) == 24
    assert e.pixel_values.shape == (96, 3 * 2 * 14 * 14)


def test_sft_batch_labels_and_mixed_images(tiny, tmp_path):
    m, p = tiny
    img = make_image(str(tmp_path / "a.png"))
    recs = [
        D.Record(id="t", problem="What is 2 plus 2?", answer="4", solution="<think>2+2=4</think> \\boxed{4}"),
        D.Record(
            id="i", problem="How many?", answer="1", images=[img], solution="<think>one</think> \\boxed{1}"
        ),
    ]
    prompts = [D.encode_prompt(r, p) for r in recs]
    b = D.collate_sft(prompts, p.tokenizer, m.config.image_token_id)
    im_end = p.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, (pr, r) in enumerate(zip(prompts, recs)):
        n_prompt = len(pr.input_ids)
        comp = D.encode_completion(r.solution, p.tokenizer)
        labels = b["labels"][i]
        assert (labels[:n_prompt] == -100).all()
        assert labels[n_prompt : n_prompt + len(comp)].tolist() == comp
        assert comp[-1] == im_end  # the closing <|im_end|> is trained
        assert (labels[n_prompt + len(comp) :] == -100).all()  # padding
        assert b["attention_mask"][i].sum() == n_prompt + len(comp)
    assert b["pixel_values"].shape[0] == prompts[1].pixel_values.shape[0]
    assert b["mm_token_type_ids"][0].sum() == 0 and b["mm_token_type_ids"][1].sum() == 4
    with pytest.raises(D.DataError, match="over max_len"):
        D.collate_sft(prompts, p.tokenizer, m.config.image_token_id, max_len=10)


def test_slice_pixel_values_with_0_1_2_images(tiny, tmp_path):
    m, p = tiny
    a = make_image(str(tmp_path / "a.png"), (56, 56), "red")
    b = make_image(str(tmp_path / "b.png"), (84, 112), "green")
    c = make_image(str(tmp_path / "c.png"), (112, 56), "blue")
    recs = [
        D.Record(id="0", problem="q0", answer="1"),
        D.Record(id="1", problem="q1", answer="1", images=[b]),
        D.Record(id="2", problem="q2", answer="1", images=[a, c]),
        D.Record(id="3", problem="q3", answer="1"),
        D.Record(id="4", problem="q4", answer="1", images=[c]),
    ]
    prompts = [D.encode_prompt(r, p) for r in recs]
    batch = D.collate_prompts(prompts, p.tokenizer.pad_token_id, m.config.image_token_id)
    parts = D.slice_pixel_values(
        batch["pixel_values"], batch["image_grid_thw"], [len(r.images) for r in recs]
    )
    for part, pr in zip(parts, prompts):
        if pr.pixel_values is None:
            assert part.shape[0] == 0
        else:
            assert torch.equal(part, pr.pixel_values)
    with pytest.raises(ValueError):
        D.slice_pixel_values(batch["pixel_values"], batch["image_grid_thw"], [1, 1, 1, 0, 0])


def test_group_repeat_processes_images_once(tiny, tmp_path, monkeypatch):
    m, p = tiny
    img = make_image(str(tmp_path / "a.png"))
    calls = []
    real = p.image_processor.__class__.__call__

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(p.image_processor.__class__, "__call__", counting)
    e = D.encode_prompt(D.Record(id="1", problem="q", answer="1", images=[img]), p)
    n = 8
    comps = [[5, 6, 7][: 1 + i % 3] for i in range(n)]
    b = D.collate_sequences([e] * n, comps, p.tokenizer.pad_token_id, m.config.image_token_id)
    assert len(calls) == 1
    assert b["pixel_values"].shape[0] == n * e.pixel_values.shape[0]
    assert b["target_mask"].sum(1).tolist() == [len(c) for c in comps]


def test_length_grouping_cuts_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (1000,), generator=g).tolist()
    order = D.length_grouped_order(lengths, 8, g)
    assert sorted(order) == list(range(1000))
    grouped = sum(D.padding_fraction([lengths[i] for i in order[s : s + 8]]) for s in range(0, 1000, 8))
    plain = sum(D.padding_fraction(lengths[s : s + 8]) for s in range(0, 1000, 8))
    assert grouped < 0.2 * plain
    assert D.padding_fraction([2, 4]) == 0.25


def test_prompt_length_from_headers_equals_the_encoded_prompt(tiny, tmp_path):
    """The start-up filter measures prompts without decoding pixels; it must count what encode_prompt makes,
    also for an image over the processor's max_pixels (resized, not dropped) and under other pixel bounds."""
    import copy

    import model as M

    _, p = tiny
    small = make_image(str(tmp_path / "s.png"), size=(56, 84))
    huge = make_image(str(tmp_path / "h.png"), size=(900, 700))
    recs = [
        D.Record(id="t", problem="What is 2 plus 3?", answer="5", source="t:1"),
        D.Record(id="s", problem="Count.", answer="1", images=[small], source="t:2"),
        D.Record(id="h", problem="Count.", answer="1", images=[huge, small], source="t:3"),
    ]
    for bounds in ((0, 0), (28 * 28 * 4, 28 * 28 * 16)):
        proc = copy.deepcopy(p)
        M.set_pixel_bounds(proc, *bounds)
        for r in recs:
            assert D.prompt_length(r, proc) == len(D.encode_prompt(r, proc).input_ids), (bounds, r.id)
    enc = D.encode_prompt(recs[2], p)
    assert int(enc.image_grid_thw[0].prod()) * 14 * 14 <= 224 * 224  # the tiny processor's max_pixels
    with pytest.raises(D.DataError, match=r"t:9: field 'images': image file not found"):
        D.prompt_length(
            D.Record(id="m", problem="x", answer="1", images=[str(tmp_path / "no.png")], source="t:9"), p
        )
