"""Training data: rows load, are checked and named before any model loads; images decode as the model needs them.

Assets: JSONL files, HF ``save_to_disk`` folders and images, all written here with PIL / ``datasets``.
"""

import dataclasses
import io
import json
import re

import datasets
import numpy as np
import pytest
from PIL import Image, ImageDraw

from stagereason.train.data import load_rows, open_image, split_rows, to_messages

TRACE = ("<SUMMARY> s </SUMMARY>\n\n<CAPTION> c </CAPTION>\n\n<REASONING> r </REASONING>\n\n"
         "<CONCLUSION> B </CONCLUSION>")


def _row(rid, image="img/a.png", human="What?", **extra):
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": TRACE}], **extra}


def _write(folder, rows, name="data.jsonl"):
    """JSONL of ``rows`` in ``folder``, with the images ``img/a.png`` (red) and ``img/b.png`` (blue)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), "red").save(folder / "img" / "a.png")
    Image.new("RGB", (20, 20), "blue").save(folder / "img" / "b.png")
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _kinds(messages):
    return [(m["role"], [c["type"] if c["type"] == "image" else c["text"] for c in m["content"]]) for m in messages]


def test_images_go_only_at_placeholders_when_any_turn_has_one():
    two_turns = {"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Ready?"}, {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": "What is <image> here?"}, {"from": "gpt", "value": "A cat."}]}
    assert _kinds(to_messages(two_turns, 1)) == [
        ("system", ["Be brief."]), ("user", ["Ready?"]), ("assistant", ["Yes."]),
        ("user", ["What is", "image", "here?"]), ("assistant", ["A cat."])]
    no_placeholder = {"conversations": [
        {"from": "human", "value": "Same?"}, {"from": "gpt", "value": "No."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
    assert _kinds(to_messages(no_placeholder, 2)) == [
        ("user", ["image", "image", "Same?"]), ("assistant", ["No."]), ("user", ["Sure?"]), ("assistant", ["Yes."])]


def test_placeholders_fewer_than_images_fail_by_row_before_training(tmp_path):
    data = _write(tmp_path, [_row("ok", human="<image> Q"), _row("short", image=["img/a.png", "img/b.png"],
                                                                  human="<image> Same?")])
    with pytest.raises(ValueError, match=r"1 invalid row\(s\) in .*data.jsonl: short: placeholders: "
                                         r"1 <image> placeholder\(s\) for 2 image\(s\)\. Fix them"):
        load_rows(str(data))
    rows, report, _ = load_rows(str(data), skip_invalid=True)
    assert [r.id for r in rows] == ["ok"] and list(report.problems) == ["short"]


def test_bad_system_turns_are_dropped_with_skip_invalid(tmp_path):
    def with_system(rid, turn):
        rec = _row(rid)
        rec["conversations"] = [turn, *rec["conversations"]]
        return rec

    data = _write(tmp_path, [with_system("sys_ok", {"from": "system", "value": "Be brief."}),
                             with_system("sys_null", {"from": "system", "value": None}),
                             with_system("sys_missing", {"from": "system"})])
    with pytest.raises(ValueError, match="sys_null: empty_turn: the system turn is empty or has no value"):
        load_rows(str(data))
    rows, report, _ = load_rows(str(data), skip_invalid=True)
    assert [r.id for r in rows] == ["sys_ok"] and list(report.problems) == ["sys_null", "sys_missing"]
    assert rows[0].messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _hf(path, ids, images, feature):
    turns = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": TRACE}]
    datasets.Dataset.from_dict(
        {"id": ids, "image": images, "conversations": [turns] * len(ids)},
        features=datasets.Features({"id": datasets.Value("string"), "image": feature,
                                    "conversations": datasets.List({"from": datasets.Value("string"),
                                                                    "value": datasets.Value("string")})}),
    ).save_to_disk(str(path))
    return str(path)


def test_hf_images_that_do_not_decode_are_named_before_training(tmp_path):
    hf = _hf(tmp_path / "hf", ["a", "b"], [_png("red"), {"bytes": b"not an image", "path": "shots/b.png"}],
             datasets.Image())
    with pytest.raises(ValueError, match=r"1 invalid row\(s\) in .*hf: b: image: image hf:1:0 \(row 1, image 0\) "
                                         r"\(b.png\) does not decode \(UnidentifiedImageError"):
        load_rows(hf)
    rows, report, _ = load_rows(hf, skip_invalid=True)
    assert [r.id for r in rows] == ["a"] and list(report.problems) == ["b"] and report.images == 2
    rows, report, _ = load_rows(hf, check_images=False)  # evaluate's quick load reads no image
    assert len(rows) == 2 and report.ok


def test_hf_image_paths_that_do_not_exist_are_named_with_or_without_image_root(tmp_path):
    _write(tmp_path / "root", [])
    hf = _hf(tmp_path / "hf", ["abs", "rel", "gone"],
             [str(tmp_path / "root/img/a.png"), "img/b.png", str(tmp_path / "nope.png")], datasets.Value("string"))
    rows, report, _ = load_rows(hf, str(tmp_path / "root"), skip_invalid=True)
    assert [r.id for r in rows] == ["abs", "rel"]
    assert report.problems == {"gone": [f"image: missing image {tmp_path / 'nope.png'}"]}
    rows, report, _ = load_rows(hf, skip_invalid=True)  # no root: relative to the dataset's own folder
    assert [r.id for r in rows] == ["abs"]
    assert report.problems["rel"] == [f"image: missing image {tmp_path / 'hf' / 'img/b.png'}"]
    _write(tmp_path / "hf", [], name="unused.txt")  # the images beside the saved dataset: found from anywhere
    rows, report, _ = load_rows(hf, skip_invalid=True)
    assert [r.id for r in rows] == ["abs", "rel"] and rows[1].images == [str(tmp_path / "hf" / "img/b.png")]


def test_hf_repeated_ids_never_take_an_existing_id(tmp_path):
    hf = _hf(tmp_path / "hf", ["x#1", "x", "x"], [_png("red")] * 3, datasets.Image())
    rows, report, _ = load_rows(hf)
    assert [r.id for r in rows] == ["x#1", "x", "x#2"] and report.ok


def test_a_folder_holding_one_data_file_loads_it_with_images_beside_it(tmp_path):
    _write(tmp_path / "d", [_row("a"), _row("b", image="img/b.png")], name="train.jsonl")
    rows, report, source = load_rows(str(tmp_path / "d"))
    assert report.ok and [r.images for r in rows] == [[str(tmp_path / "d/img/a.png")], [str(tmp_path / "d/img/b.png")]]
    assert open_image(source(rows[1].images[0])).getpixel((0, 0)) == (0, 0, 255)
    _write(tmp_path / "d", [_row("c")], name="test.jsonl")
    with pytest.raises(ValueError, match=r"holds several data files \(test.jsonl, train.jsonl\)"):
        load_rows(str(tmp_path / "d"))


def test_a_separate_eval_set_drops_its_invalid_rows_with_skip_invalid(tmp_path):
    rows, _, source = load_rows(str(_write(tmp_path / "train", [_row("t")])))
    held = _write(tmp_path / "eval", [_row("e1"), _row("e2", image="img/gone.png")])
    with pytest.raises(ValueError, match=r"e2: image: missing image"):
        split_rows(rows, str(held), 0, None, source)
    train, evals = split_rows(rows, str(held), 0, None, source, skip_invalid=True)
    assert [r.id for r in train] == ["t"] and [r.id for r in evals] == ["e1"]


def _save(im, path, **kw):
    im.save(path, **kw)
    return path


def test_transparency_is_composited_over_white(tmp_path):
    logo = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(logo).rectangle([8, 8, 23, 23], fill=(0, 0, 0, 255))
    for name, im in [("rgba.png", logo), ("la.png", logo.convert("LA")),
                     ("p.png", logo.convert("P"))]:  # P: a palette entry marked transparent
        out = open_image(_save(im, tmp_path / name))
        assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255), name
        assert out.getpixel((16, 16)) == (0, 0, 0), name


def test_exif_orientation_is_applied_first(tmp_path):
    im = Image.new("RGB", (80, 40), "blue")
    ImageDraw.Draw(im).rectangle([0, 0, 19, 19], fill="red")  # a mark in the stored top-left corner
    for tag, corner in ((6, (29, 0)), (8, (0, 59))):  # 6: shown turned a quarter clockwise; 8: anticlockwise
        exif = im.getexif()
        exif[0x0112] = tag
        out = open_image(_save(im, tmp_path / f"side{tag}.png", exif=exif), max_side=60)
        assert out.size == (30, 60), tag
        r, g, b = out.getpixel(corner)  # the mark is where the turn puts it, at the shrunk size
        assert r > 200 and b < 60, (tag, out.getpixel(corner))
        r, g, b = out.getpixel((29 - corner[0], 59 - corner[1]))
        assert b > 200 and r < 60, tag


def test_16_bit_grey_is_scaled_not_saturated(tmp_path):
    im = Image.fromarray(np.array([[0, 30000, 65535]], dtype=np.uint16))
    assert im.mode.startswith("I")
    out = np.asarray(open_image(_save(im, tmp_path / "g16.png")))
    assert out[0, :, 0].tolist() == [0, 117, 255]  # 30000 / 257 = 116.7


def test_a_big_image_is_shrunk_not_refused_and_any_decode_failure_names_the_image(tmp_path, monkeypatch):
    from stagereason.data_gen import validate

    big = _save(Image.new("RGB", (200, 100), "red"), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # PIL's cap, lowered so the "big" image stays small
    assert open_image(big, max_side=50).size == (50, 25)
    monkeypatch.setattr(validate, "_MAX_PIXELS", 5000)  # past our own cap it is an error, named as any other
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ValueError, match=r"image .*big.png cannot be read \(DecompressionBombError"):
        open_image(big)
    (tmp_path / "cut.png").write_bytes(big.read_bytes()[:80])
    with pytest.raises(ValueError, match=r"image .*cut.png cannot be read \("):
        open_image(tmp_path / "cut.png")


def test_a_missing_local_dataset_is_named_without_asking_the_hub(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/nope", str(tmp_path / "nope"), "./data.jsonl", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"no dataset at {re.escape(name)}: it does not exist"):
            load_rows(name)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(FileNotFoundError, match="org/name: not a local file or folder, and loading it as a Hub "
                                                r"dataset failed \(ConnectionError: offline\)"):
        load_rows("org/name")


def test_an_image_path_that_is_a_folder_or_a_url_says_so(tmp_path):
    for src, said in ((tmp_path, "is a folder, not an image file"),
                      ("https://example.com/a.png", "is a URL: images are read from files"),
                      (tmp_path / "none.png", "does not exist")):
        with pytest.raises(FileNotFoundError, match=f"image {re.escape(str(src))} {said}"):
            open_image(str(src))


def test_image_size_from_the_header_equals_the_opened_image(tmp_path):
    # token lengths of other VLMs count image tokens from these sizes: they must be what the collator will open
    import random

    from stagereason.train.data import _thumbnail_size, image_size

    rng = random.Random(0)
    for _ in range(300):  # PIL's own thumbnail rounding, on sizes of every shape
        w, h, side = rng.randint(1, 5000), rng.randint(1, 5000), rng.randint(16, 2240)
        im = Image.new("1", (w, h))
        im.thumbnail((side, side))
        assert (_thumbnail_size(w, h, side) if max(w, h) > side else (w, h)) == im.size
    stored = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: stored 300 x 120, shown 120 x 300
    Image.new("RGB", (300, 120), "red").save(stored, exif=exif)
    for cap in (None, 200, 50):
        assert image_size(str(stored), cap) == open_image(str(stored), cap).size
    with pytest.raises(FileNotFoundError):  # validation names bad images before sizes are asked
        image_size(str(tmp_path / "missing.png"))


def test_a_deepspeed_checkpoint_that_cannot_be_read_is_named(tmp_path):
    from stagereason.train.rundir import _check_checkpoint_kind

    ckpt = tmp_path / "checkpoint-2"
    (ckpt / "global_step2").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step2")
    with pytest.raises(ValueError, match="names 'global_step2', which holds no DeepSpeed model states"):
        _check_checkpoint_kind(ckpt, "lora")
    (ckpt / "global_step2/zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="zero_pp_rank_0_mp_rank_00_model_states.pt cannot be read"):
        _check_checkpoint_kind(ckpt, "lora")


def test_an_images_list_field_is_read_as_image(tmp_path):
    """``images``, the name ShareGPT and LLaMA-Factory data use, is the same as ``image``."""
    rows = [{**_row("two", human="Same?"), "images": ["img/a.png", "img/b.png"]}, _row("one")]
    del rows[0]["image"]
    data = _write(tmp_path, rows)
    loaded, report, _ = load_rows(str(data))
    assert report.ok and report.images == 3
    assert loaded[0].images == [str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png")]
    assert [c["type"] for c in loaded[0].messages[0]["content"]] == ["image", "image", "text"]
    both = _write(tmp_path, [{**_row("both"), "images": ["img/b.png"]}], name="both.jsonl")
    with pytest.raises(ValueError, match="both: image: both image and images are given; keep one"):
        load_rows(str(both))
    hf = tmp_path / "hf"
    turns = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": TRACE}]
    datasets.Dataset.from_dict({"id": ["h"], "images": [[_png("red"), _png("blue")]], "conversations": [turns]},
                               features=datasets.Features({
                                   "id": datasets.Value("string"), "images": datasets.List(datasets.Image()),
                                   "conversations": datasets.List({"from": datasets.Value("string"),
                                                                   "value": datasets.Value("string")})}),
                               ).save_to_disk(str(hf))
    loaded, report, source = load_rows(str(hf))
    assert report.ok and loaded[0].images == ["hf:0:0", "hf:0:1"]
    assert open_image(source(loaded[0].images[1])).getpixel((0, 0)) == (0, 0, 255)


def test_a_parquet_file_loads_as_a_table_with_images_beside_it(tmp_path):
    _write(tmp_path, [])
    turns = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": TRACE}]
    datasets.Dataset.from_dict({"id": ["p0", "p1"], "image": ["img/a.png", "img/b.png"],
                                "conversations": [turns, turns]}).to_parquet(str(tmp_path / "train.parquet"))
    rows, report, _ = load_rows(str(tmp_path / "train.parquet"))
    assert report.ok and [r.id for r in rows] == ["p0", "p1"] and rows[1].images == [str(tmp_path / "img/b.png")]
    (tmp_path / "gone.parquet").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="gone.parquet: it does not exist"):
        load_rows(str(tmp_path / "gone.parquet"))
    (tmp_path / "bad.parquet").write_text("not a parquet file")
    with pytest.raises(ValueError, match=r"bad.parquet cannot be read as a parquet file \(ArrowInvalid"):
        load_rows(str(tmp_path / "bad.parquet"))


def test_a_dataset_dict_gives_its_train_split_and_an_eval_dict_its_test_split(tmp_path):
    turns = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": TRACE}]  # the second: the staged answer

    def split(ids):  # a question of its own per row
        return datasets.Dataset.from_dict({"id": ids, "conversations": [
            [{"from": "human", "value": f"Q {i}?"}, turns[1]] for i in ids]})

    datasets.DatasetDict({"train": split(["t0", "t1", "t2"]), "test": split(["e0"])}).save_to_disk(str(tmp_path / "d"))
    rows, _, source = load_rows(str(tmp_path / "d"))
    train, held = split_rows(rows, str(tmp_path / "d"), 0, None, source)
    assert [r.id for r in train] == ["t0", "t1", "t2"] and [r.id for r in held] == ["e0"]
    datasets.DatasetDict({"validation": split(["v0"])}).save_to_disk(str(tmp_path / "only"))
    assert [r.id for r in load_rows(str(tmp_path / "only"))[0]] == ["v0"]  # its one split
    datasets.DatasetDict({"a": split(["a0"]), "b": split(["b0"])}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(ValueError, match="holds the splits a, b, none of them train"):
        load_rows(str(tmp_path / "ab"))


def test_an_eval_split_of_training_rows_or_of_no_rows_is_refused(tmp_path, caplog):
    data = _write(tmp_path, [_row("a"), _row("b", image="img/b.png"), _row("c", human="Other?")])
    rows, _, source = load_rows(str(data))
    with pytest.raises(ValueError, match="every held-out row is also a training row"):
        split_rows(rows, str(data), 0, None, source)
    some = _write(tmp_path, [_row("x"), _row("new", human="New?")], name="some.jsonl")
    with caplog.at_level("WARNING", logger="stagereason.train.data"):
        train, held = split_rows(rows, str(some), 0, None, source)
    assert len(held) == 2 and "1 of 2 held-out rows (--eval_split" in caplog.text
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no rows in it"):
        split_rows(rows, str(tmp_path / "empty.jsonl"), 0, None, source)
    assert split_rows(rows, "0.0", 0)[1] == [] and split_rows(rows, 0.0, 0)[1] == []


def test_a_fraction_split_keeps_the_rows_about_one_image_together(tmp_path, caplog):
    rows = [_row(f"a{i}", human=f"Question {i} on a?") for i in range(6)]
    rows += [_row(f"b{i}", image="img/b.png", human=f"Question {i} on b?") for i in range(4)]
    rows += [{**_row(f"t{i}", human=f"Text only {i}?"), "image": None} for i in range(10)]
    loaded, _, _ = load_rows(str(_write(tmp_path, rows)))
    for seed in range(8):
        train, held = split_rows(loaded, "0.25", seed)
        assert len(train) == 15 and len(held) == 5  # whole groups, as many as fit: never more than asked
        seen = {tuple(r.images) for r in train if r.images}
        assert not any(tuple(r.images) in seen for r in held if r.images)  # no held-out image was trained on
    twice = loaded[6:] + [dataclasses.replace(r) for r in loaded[10:]]  # text-only rows repeated (upsampled)
    for seed in range(4):
        train, held = split_rows(twice, "0.25", seed)
        assert not {(r.question, r.answer) for r in held} & {(r.question, r.answer) for r in train}
    with caplog.at_level("WARNING", logger="stagereason.train.data"):  # one image: split by row, and said so
        train, held = split_rows(loaded[:6], "0.5", 0)
    assert len(held) == 3 and "held-out rows are drawn one by one" in caplog.text


def test_rows_linked_by_any_image_or_spelt_differently_stay_on_one_side(tmp_path):
    """A row of two images joins the groups of both; ``img/./a.png`` is ``img/a.png``."""
    for name, color in (("c", "green"), ("d", "white")):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.new("RGB", (20, 20), color).save(tmp_path / "img" / f"{name}.png")
    rows = [_row("a1", image="img/a.png"), _row("a2", image="img/./a.png", human="Another?"),
            _row("ab", image=["img/a.png", "img/b.png"], human="<image> and <image>?"), _row("b1", image="img/b.png"),
            _row("c1", image="img/c.png"), _row("c2", image="img//c.png", human="Again?"),
            _row("d1", image="img/d.png"), _row("d2", image="img/d.png", human="Again?")]
    loaded, _, _ = load_rows(str(_write(tmp_path, rows)))
    groups = [{"a1", "a2", "ab", "b1"}, {"c1", "c2"}, {"d1", "d2"}]
    for seed in range(12):
        train, held = split_rows(loaded, "4", seed)
        held_ids = {r.id for r in held}
        assert len(held) == 4 and all(g <= held_ids or not g & held_ids for g in groups), (seed, held_ids)


def test_windows_line_ends_are_read_as_newlines(tmp_path):
    rows = [_row("crlf", human="Line one.\r\nLine two?")]
    rows[0]["conversations"][1]["value"] = TRACE.replace("\n", "\r\n")
    (loaded,), _, _ = load_rows(str(_write(tmp_path, rows)))
    texts = [c["text"] for m in loaded.messages for c in m["content"] if c["type"] == "text"]
    assert texts == ["Line one.\nLine two?", TRACE] and not any("\r" in t for t in texts)


def _staged(conclusion):
    return (f"<SUMMARY> I will read the figure. </SUMMARY>\n\n<CAPTION> The figure shows it. </CAPTION>\n\n"
            f"<REASONING> So the answer is {conclusion}. </REASONING>\n\n<CONCLUSION> {conclusion} </CONCLUSION>")


def test_the_published_llava_cot_100k_layout_loads_as_is_given_its_image_root(tmp_path, tiny_dir, capsys):
    # LLaVA-CoT-100k's train.jsonl: {"id", "image": "<folder>/<file>", "conversations": [{"from": "human"} with no
    # <image> placeholder, {"from": "gpt"} staged answer, ...]}; its images unpack into one folder per source set,
    # kept apart from the file here. Images of its sources' kinds: palette, RGBA, grey, and a large JPEG page.
    from stagereason.cli import main

    root, meta = tmp_path / "LLaVA-CoT-100k", tmp_path / "meta"
    kinds = {"ai2d/images/4000.png": ("P", (320, 240)), "CLEVR_v1.0/images/train/CLEVR_train_000001.png":
             ("RGBA", (480, 320)), "geoqa+/images/12.png": ("L", (203, 130)), "docvqa/train/documents/f.jpg":
             ("RGB", (1700, 2200)), "sqa/train/4360/image.png": ("RGB", (300, 200))}
    for rel, (mode, size) in kinds.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, "green").convert(mode).save(root / rel)
    question = "Which label shows the larva?\nA. A\nB. B\nAnswer with the option's letter from the given choices directly."
    published = [{"id": rel.split("/")[0], "image": rel, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": _staged("B")}]} for rel in kinds]
    published[-1]["conversations"] += [{"from": "human", "value": "Which state is farthest north?"},
                                       {"from": "gpt", "value": _staged("West Virginia")}]
    meta.mkdir()
    (meta / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in published))

    rows, report, _ = load_rows(str(meta / "train.jsonl"), str(root))
    assert report.ok and report.rows == 5 and report.images == 5
    assert [r.images for r in rows] == [[str(root / rel)] for rel in kinds]
    assert [r.answer for r in rows] == ["B", "B", "B", "B", "West Virginia"]  # the last turn's conclusion
    assert _kinds(rows[-1].messages) == [("user", ["image", question]), ("assistant", [_staged("B")]),
                                         ("user", ["Which state is farthest north?"]),
                                         ("assistant", [_staged("West Virginia")])]
    for rel in kinds:  # each image decodes as the model gets it, its longest side capped
        im = open_image(str(root / rel), 1120)
        assert im.mode == "RGB" and max(im.size) <= 1120
    with pytest.raises(ValueError, match=r"5 invalid row\(s\) .* ai2d: image: missing image .*meta/ai2d/images/4000"):
        load_rows(str(meta / "train.jsonl"))  # without the image root, paths are relative to the file's folder

    args = ["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(meta / "train.jsonl"), "--image_root",
            str(root), "--eval_split", "1", "--dry_run", "--json", "--output_dir", str(tmp_path / "run")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["rows"], summary["images"], summary["train_rows"], summary["eval_rows"]) == (5, 5, 4, 1)
    assert summary["invalid_dropped"] == summary["too_long_dropped"] == 0
