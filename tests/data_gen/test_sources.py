"""Sources: LLaVA JSON and JSONL, HF datasets with column mapping, synthetic; bad rows become errors.

Assets: files and datasets written here (PIL images, datasets.Dataset.save_to_disk).
"""

import io
import json

import datasets
import pytest
from PIL import Image

from stagereason.cli import main
from stagereason.data_gen.sources import hf_examples, llava_examples, synthetic_examples

from .assets import row, write_llava


def test_llava_json_list_with_system_turn_duplicates_and_image_lists(tmp_path):
    write_llava(tmp_path, [])
    rows = [
        {"id": "a", "image": "imgs/0.jpg", "conversations": [
            {"from": "system", "value": "be brief"}, {"from": "human", "value": "<image>\nQ1"},
            {"from": "gpt", "value": "A1"}]},
        row("a", "Q2", "A2"),
        {"id": "two", "image": ["imgs/0.jpg", "imgs/1.jpg"], "conversations": [
            {"from": "human", "value": "<image> <image> same?"}, {"from": "gpt", "value": "no"}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        "not a dict",
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    exs = list(llava_examples(tmp_path / "d.json"))
    assert [e.id for e in exs] == ["a", "a#1", "two", "text-only", "row-4"]
    assert exs[0].turns[0].question == "Q1" and exs[0].turns[0].human == "<image>\nQ1"
    assert exs[2].images == [tmp_path / "imgs/0.jpg", tmp_path / "imgs/1.jpg"] and not exs[2].single_image_field
    assert exs[3].images == [] and exs[3].error is None
    assert "not a JSON object" in exs[4].error


def test_llava_bad_json_file_is_a_clear_error(tmp_path):
    (tmp_path / "d.json").write_text("[{\"id\": 1,")
    with pytest.raises(ValueError, match="d.json is not valid JSON"):
        list(llava_examples(tmp_path / "d.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(llava_examples(tmp_path / "missing.jsonl"))


def _hf_dataset(tmp_path):
    imgs = [Image.new("RGB", (20, 20), c) for c in ("red", "blue", "green")]
    ds = datasets.Dataset.from_dict({
        "qid": ["q1", "q2", "q3"], "image": imgs,
        "q": ["Which color?", "Which shape?", ""],
        "ans": [1, 0, 2], "opts": [["red", "blue"], ["circle", "square"], ["a", "b", "c"]],
        "hint": ["Look at the middle.", None, None], "subject": ["colors", "shapes", "x"],
    }).cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "hf")
    return tmp_path / "hf"


def test_hf_column_mapping_choices_and_index_answers(tmp_path):
    path = _hf_dataset(tmp_path)
    exs = list(hf_examples(str(path), id_column="qid", question_column="q", answer_column="ans",
                           choices_column="opts", hints_column="hint"))
    assert [e.id for e in exs] == ["q1", "q2", "q3"]
    assert exs[0].turns[0].answer == "B" and exs[0].choices == {"A": "red", "B": "blue"}
    assert exs[0].turns[0].question == "Which color?\nOptions:\nA. red\nB. blue"
    assert exs[0].hints == ["Look at the middle."] and exs[0].extra == {"subject": "colors"}
    # the stored file bytes are sent as they are (no decode and PNG re-encode per request)
    assert isinstance(exs[0].images[0], bytes) and Image.open(io.BytesIO(exs[0].images[0])).size == (20, 20)
    assert exs[0].image_names[0] == "q1.png"  # written under the suffix of the format written (see below)
    assert exs[2].error == "row 'q3': empty question"
    with pytest.raises(ValueError, match="--question_column 'question' is not a column"):
        list(hf_examples(str(path)))


def test_gen_from_hf_through_a_teacher_and_hf_out(tmp_path):
    from stagereason.data_gen.loopback import LoopbackTeacher

    path = _hf_dataset(tmp_path)
    with LoopbackTeacher() as t:
        code = main(["gen", "--source", "hf", "--data", str(path), "--id_column", "qid", "--question_column", "q",
                     "--answer_column", "ans", "--choices_column", "opts", "--hints_column", "hint",
                     "--out", str(tmp_path / "out"), "--teacher_base_url", t.url, "--teacher_model", "m",
                     "--hf_out", str(tmp_path / "hf_out"), "--no_progress"])
    assert code == 0
    recs = sorted((json.loads(x) for x in (tmp_path / "out" / "data.jsonl").read_text().splitlines()),
                  key=lambda r: r["id"])  # written in completion order
    assert [r["id"] for r in recs] == ["q1", "q2"] and recs[0]["image"] == "images/q1.png"
    assert recs[0]["choices"] == {"A": "red", "B": "blue"} and recs[0]["subject"] == "colors"
    saved = datasets.load_from_disk(str(tmp_path / "hf_out"))
    assert saved.num_rows == 2 and saved[0]["image"].size == (20, 20)


def test_synthetic_examples_carry_ready_traces():
    exs = list(synthetic_examples(3, seed=1))
    assert all(e.trace and e.images and e.image_names == [f"{e.id}.png"] for e in exs)
    assert exs[0].extra["family"] and exs[0].extra["difficulty"] == 1


def test_gen_refuses_foreign_output_dir_and_missing_options(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["gen", "--out", str(tmp_path / "mine"), "--n", "3", "--no_progress"]) == 1
    assert "not empty and was not made by stagereason gen" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["gen", "--source", "llava", "--out", str(tmp_path / "x")]) == 2
    assert "--data is required with --source llava" in capsys.readouterr().err
    data = write_llava(tmp_path, [row("a", "Q", "B")])
    assert main(["gen", "--source", "llava", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "needs a teacher" in capsys.readouterr().err


def test_hf_out_never_writes_into_a_folder_of_other_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["gen", "--n", "3", "--no_progress", "--out"]
    assert main([*args, str(tmp_path / "a"), "--hf_out", str(mine)]) == 1
    assert "--hf_out" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert main([*args, str(tmp_path / "b"), "--hf_out", str(tmp_path / "hf")]) == 0
    assert main([*args, str(tmp_path / "b"), "--hf_out", str(tmp_path / "hf")]) == 0  # its own dataset: replaced
    assert len(datasets.load_from_disk(str(tmp_path / "hf"))) == 3


def test_a_json_file_that_is_not_a_list_is_refused_by_name(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": [row("a", "<image>\nQ?", "A")]}, indent=2))
    with pytest.raises(ValueError, match="rows.json holds a JSON dict, not a list"):
        list(llava_examples(path))
    lines = tmp_path / "lines.json"  # JSON lines under a .json name still read as lines
    lines.write_text(json.dumps(row("a", "<image>\nQ?", "A")) + "\n" + json.dumps(row("b", "<image>\nQ?", "B")) + "\n")
    assert [e.id for e in llava_examples(lines)] == ["a", "b"]
    one = tmp_path / "one.json"  # one JSON line: a row, not a refused dict
    one.write_text(json.dumps(row("a", "<image>\nQ?", "A")) + "\n")
    assert [e.id for e in llava_examples(one)] == ["a"]
    from stagereason.data_gen.validate import check_dataset

    for f in (lines, one):  # validate (and so train) read them as gen does
        report = check_dataset(f, check_images=False)
        assert report.rows == (2 if f is lines else 1) and "json" not in report.kinds


def test_gen_names_each_written_image_by_the_format_of_its_bytes(tmp_path):
    """JPEG bytes are kept and named .jpg; a BMP is sent and written as PNG, so it is named .png, not .bmp."""
    from stagereason.data_gen.loopback import LoopbackTeacher

    def encoded(fmt):
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), "red").save(buf, format=fmt)
        return {"bytes": buf.getvalue(), "path": None}

    ds = datasets.Dataset.from_dict({"qid": ["j", "b"], "image": [encoded("JPEG"), encoded("BMP")],
                                     "q": ["Which color?"] * 2, "ans": ["red"] * 2})
    ds.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "hf")
    with LoopbackTeacher() as t:
        assert main(["gen", "--source", "hf", "--data", str(tmp_path / "hf"), "--id_column", "qid",
                     "--question_column", "q", "--answer_column", "ans", "--out", str(tmp_path / "out"),
                     "--teacher_base_url", t.url, "--teacher_model", "m", "--no_progress"]) == 0
    recs = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "data.jsonl").read_text().splitlines())}
    assert recs["j"]["image"] == "images/j.jpg" and recs["b"]["image"] == "images/b.png"
    for rec, fmt in ((recs["j"], "JPEG"), (recs["b"], "PNG")):
        assert Image.open(tmp_path / "out" / rec["image"]).format == fmt


def test_llava_repeated_ids_never_take_an_existing_id_and_a_bom_is_read(tmp_path):
    write_llava(tmp_path, [])
    rows = [row("x#1", "Q", "A"), row("x", "Q", "A"), row("x", "Q", "A")]
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    exs = list(llava_examples(tmp_path / "d.jsonl"))
    assert [e.id for e in exs] == ["x#1", "x", "x#2"] and all(e.error is None for e in exs)
