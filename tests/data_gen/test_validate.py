"""validate: each problem kind is found and named with its row; a clean set passes.

Assets: gen output built here from procedural scenes; broken rows written here.
"""

import json

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
