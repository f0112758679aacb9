"""validate: each problem kind is found and named with its row; a clean set passes.

Assets: gen output built here from procedural scenes; broken rows written here.
"""

import json

import pytest

from stagereason.cli import main
from stagereason.data_gen.validate import check_dataset
from stagereason.stages import StagedTrace

from .assets import write_llava

TRACE = StagedTrace("plan", "see", "think", "B").render()


def _row(rid, image="imgs/0.jpg", human="What?", gpt=TRACE, **extra):
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}], **extra}


def test_clean_gen_output_passes(tmp_path, capsys):
    assert main(["gen", "--out", str(tmp_path / "d"), "--n", "30", "--no_progress"]) == 0
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "d")]) == 0
    assert "dataset is valid" in capsys.readouterr().out


def test_every_problem_kind_is_reported_with_its_row(tmp_path, capsys):
    rows = [
        _row("good"),
        _row("no_placeholder_is_fine", human="Describe."),  # LLaVA-CoT-100k strips <image>
        _row("one_placeholder", human="<image>\nDescribe."),
        _row("two_placeholders", human="<image> <image> Describe."),
        _row("missing_img", image="imgs/none.png"),
        _row("corrupt_img", image="imgs/corrupt.jpg"),
        _row("bad_trace", gpt="<SUMMARY> a </SUMMARY> B"),
        {"id": "roles", "image": "imgs/0.jpg", "conversations": [{"from": "gpt", "value": TRACE}]},
        _row("good"),
        {"id": "multi", "image": "imgs/1.jpg", "conversations": [
            {"from": "human", "value": "Q"}, {"from": "gpt", "value": TRACE},
            {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "<CAPTION> x </CAPTION>"}]},
    ]
    data = write_llava(tmp_path, rows, extra_lines=["{oops"])
    rep = check_dataset(data)
    kinds = {row: sorted({m.split(":")[0] for m in msgs}) for row, msgs in rep.problems.items()}
    assert kinds == {
        "two_placeholders": ["placeholders"], "missing_img": ["image"], "corrupt_img": ["image"],
        "bad_trace": ["stage_format"], "roles": ["roles"], "multi": ["stage_format"], "line 11": ["json"],
    }
    assert rep.repeated_ids == {"good": 2}  # one image, several questions: reported, not an error
    assert "gpt turn 2: missing stages <SUMMARY>, <REASONING>, <CONCLUSION>" in rep.problems["multi"][0]
    assert rep.rows == 11 and rep.images == 9
    assert main(["validate", str(data), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["bad_rows"] == 7 and out["image"].startswith("2 rows: missing_img, corrupt_img")


def test_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nothing")]) == 1
    assert "no dataset at" in capsys.readouterr().err


def test_placeholders_must_match_the_images_one_to_one(tmp_path):
    """A row with placeholders but fewer than its images would die mid-training without its name."""
    two = ["imgs/0.jpg", "imgs/1.jpg"]
    rows = [
        _row("one_for_two", image=two, human="<image> Same?"),
        _row("two_for_two", image=two, human="<image> <image> Same?"),
        _row("none_for_two", image=two, human="Same?"),  # no placeholder at all: images lead the first turn
        {"id": "in_turn_2", "image": "imgs/0.jpg", "conversations": [
            {"from": "human", "value": "Ready?"}, {"from": "gpt", "value": TRACE},
            {"from": "human", "value": "<image> What?"}, {"from": "gpt", "value": TRACE}]},
        {"id": "one_per_turn_for_one", "image": "imgs/0.jpg", "conversations": [
            {"from": "human", "value": "<image> Q"}, {"from": "gpt", "value": TRACE},
            {"from": "human", "value": "<image> What?"}, {"from": "gpt", "value": TRACE}]},
    ]
    rep = check_dataset(write_llava(tmp_path, rows))
    assert rep.problems == {
        "one_for_two": ["placeholders: 1 <image> placeholder(s) for 2 image(s)"],
        "one_per_turn_for_one": ["placeholders: 2 <image> placeholder(s) for 1 image(s)"],
    }


def test_system_turns_are_checked_like_the_others(tmp_path):
    def convs(*turns):
        return [{"from": f, **({} if v is ... else {"value": v})} for f, v in turns]

    rows = [
        _row("sys_ok") | {"conversations": convs(("system", "Be brief."), ("human", "Q"), ("gpt", TRACE))},
        _row("sys_null") | {"conversations": convs(("system", None), ("human", "Q"), ("gpt", TRACE))},
        _row("sys_missing") | {"conversations": convs(("system", ...), ("human", "Q"), ("gpt", TRACE))},
        _row("sys_blank") | {"conversations": convs(("system", "  "), ("human", "Q"), ("gpt", TRACE))},
        _row("sys_number") | {"conversations": convs(("system", 3), ("human", "Q"), ("gpt", TRACE))},
        _row("sys_late") | {"conversations": convs(("human", "Q"), ("system", "Be brief."), ("gpt", TRACE))},
    ]
    rep = check_dataset(write_llava(tmp_path, rows))
    empty = ["empty_turn: the system turn is empty or has no value"]
    assert rep.problems == {"sys_null": empty, "sys_missing": empty, "sys_blank": empty, "sys_number": empty,
                            "sys_late": ["roles: turn 2 is a system turn; only the first turn may be"]}


def test_renamed_repeated_ids_never_take_an_existing_id(tmp_path):
    rows = [_row("x#1"), _row("x"), _row("x"), _row("y"), _row("y"), _row("y#1")]
    records = []
    rep = check_dataset(write_llava(tmp_path, rows), records=records)
    assert [name for name, _ in records] == ["x#1", "x", "x#2", "y", "y#1", "y#1#1"]
    assert rep.ok and rep.repeated_ids == {"x": 2, "y": 2}


def test_utf8_bom_is_read_and_bad_utf8_is_named(tmp_path):
    write_llava(tmp_path, [])
    rows = [_row("a"), _row("b", human="Qué?")]
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "bom.json").write_bytes(bom + json.dumps(rows, indent=1).encode())
    for name in ("bom.jsonl", "bom.json"):
        records = []
        rep = check_dataset(tmp_path / name, records=records)
        assert rep.ok and rep.rows == 2 and [n for n, _ in records] == ["a", "b"], name
    lines = [json.dumps(r).encode() for r in rows]
    lines[1] = lines[1].replace(b'"b"', b'"b\xff"')
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rep = check_dataset(tmp_path / "bad.jsonl")
    at = lines[1].index(b"\xff")
    assert rep.problems == {"line 2": [f"json: {tmp_path / 'bad.jsonl'} line 2 is not valid UTF-8 (byte {at} of the line)"]}
    (tmp_path / "bad.json").write_bytes(b"[" + b",".join(lines) + b"]")
    with pytest.raises(ValueError, match=rf"bad.json is not valid UTF-8 \(byte offset {2 + len(lines[0]) + at}\)"):
        check_dataset(tmp_path / "bad.json")


def test_a_folder_means_its_one_data_file(tmp_path):
    from stagereason.data_gen.validate import resolve_data_file

    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "README.md").write_text("")
    assert resolve_data_file(tmp_path) == tmp_path / "train.jsonl"
    (tmp_path / "test.json").write_text("")
    with pytest.raises(ValueError, match=r"holds several data files \(test.json, train.jsonl\)"):
        resolve_data_file(tmp_path)
    (tmp_path / "data.jsonl").write_text("")  # a gen output dir: its data.jsonl, whatever else is there
    assert resolve_data_file(tmp_path) == tmp_path / "data.jsonl"


def test_a_big_image_is_not_a_decompression_bomb(tmp_path, monkeypatch):
    """PIL's pixel cap (lowered here so the image stays small) must not make a valid image "corrupt"."""
    from PIL import Image

    from stagereason.data_gen.validate import _check_image

    Image.new("RGB", (200, 100), "red").save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 20000 pixels: past twice the cap, a bomb to PIL
    assert _check_image(tmp_path / "big.png") is None


def test_hf_datasets_empty_files_and_missing_images_without_decoding(tmp_path, capsys):
    import datasets
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "imgs" / "0.jpg")
    turns = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": TRACE}]
    datasets.Dataset.from_dict({"id": ["ok", "gone"], "image": ["imgs/0.jpg", "imgs/gone.jpg"],
                                "conversations": [turns, turns]}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "hf" / "imgs").symlink_to(tmp_path / "imgs")  # paths relative to the saved dataset's folder
    assert main(["validate", str(tmp_path / "hf"), "--json"]) == 1  # a HF dataset, checked as training loads it
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 2 and list(out["problems"]) == ["gone"] and "missing image" in out["problems"]["gone"][0]
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["validate", str(tmp_path / "empty.jsonl"), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 0 and not out["valid"] and "no rows" in out["empty"]
    data = write_llava(tmp_path / "d", [_row("ok"), _row("gone", image="imgs/gone.jpg")])
    assert main(["validate", str(data), "--no_check_images", "--json"]) == 1  # not decoded, but there
    out = json.loads(capsys.readouterr().out)
    assert list(out["problems"]) == ["gone"] and "missing image" in out["problems"]["gone"][0]


def test_rows_in_other_layouts_are_named_for_what_they_are(tmp_path):
    (tmp_path / "imgs" / "a_folder").mkdir(parents=True)
    rows = [
        {"id": "chat", "image": "imgs/0.jpg", "conversations": [{"role": "user", "content": "What?"},
                                                                {"role": "assistant", "content": TRACE}]},
        _row("number", human=42),
        _row("url", image="https://example.com/cat.jpg"),
        _row("folder", image="imgs/a_folder"),
        {**_row("ignored"), "id": None},
    ]
    records = []
    report = check_dataset(write_llava(tmp_path, rows), records=records)
    assert "turn 1 is written as role/content (chat messages)" in report.problems["chat"][0]
    assert report.problems["number"] == ["empty_turn: turn 1 (human) has a value of type int, not text"]
    assert report.problems["url"] == ["image: image https://example.com/cat.jpg is a URL: images are read from "
                                      "files; download it first"]
    assert report.problems["folder"] == [f"image: image {tmp_path / 'imgs/a_folder'} is a folder, not an image file"]
    assert [name for name, _ in records][-1] == "line 5" and "line 5" not in report.problems  # "id": null: where
