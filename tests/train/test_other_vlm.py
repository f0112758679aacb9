"""train on VLMs other than Mllama, built tiny in code: LLaVA-NeXT, whose processor turns each image placeholder
into many tokens (their number depends on the image's size), Gemma 3 (a fixed run of image tokens between
begin/end-of-image tokens, token types that training needs), and Qwen2.5-VL and Qwen3-VL (a run of image tokens
that depends on the image's size, 3-D rotary positions; they need torchvision and skip without it). Labels, token
lengths and training must hold there too."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from stagereason.cli import main
from stagereason.train.collate import StageCollator
from stagereason.train.data import load_rows
from stagereason.train.runner import _add_image_tokens, _eos_ids, _token_lengths
from stagereason.train.templates import training_chat_template

from .tiny_gemma3 import build_tiny_gemma3
from .tiny_llava_next import build_tiny_llava_next
from .tiny_qwen_vl import build_tiny_qwen_vl

MAX_SIDE = 2240  # what train gives a processor without tiles (560 x 4)
SIZES = [(128, 128), (200, 90), (90, 200), (300, 300), (2500, 700), (57, 333)]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_tiny_llava_next(tmp_path_factory.mktemp("llava") / "model")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "model")


def _qwen(tmp_path_factory, version):
    pytest.importorskip("torchvision", reason="Qwen-VL's processor needs torchvision")
    return build_tiny_qwen_vl(tmp_path_factory.mktemp(f"qwen{version}") / "model", version)


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory):
    return _qwen(tmp_path_factory, "2.5")


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    return _qwen(tmp_path_factory, "3")


VLMS = ["llava_next", "gemma3", "qwen2_5_vl", "qwen3_vl"]
END_OF_TURN = {"llava_next": "</s>", "gemma3": "<end_of_turn>", "qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>"}


@pytest.fixture(params=VLMS)
def vlm(request):
    """(model dir, model type) of each tiny VLM."""
    name = request.param
    return request.getfixturevalue("llava" if name == "llava_next" else name), name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 staged rows (from `stagereason gen`) whose images have other sizes and shapes; one is a JPEG that
    EXIF turns a quarter (stored 160 x 60, shown 60 x 160)."""
    root = tmp_path_factory.mktemp("llava-data")
    assert main(["gen", "--out", str(root / "gen"), "--n", "12", "--no_progress"]) == 0
    rows = [json.loads(line) for line in (root / "gen/data.jsonl").read_text().splitlines()]
    (root / "images").mkdir()
    for i, r in enumerate(rows):
        im = Image.open(root / "gen" / r["image"]).convert("RGB")
        if i == len(SIZES):
            exif = Image.Exif()
            exif[0x0112] = 6
            im.resize((160, 60)).save(root / f"images/{i}.jpg", exif=exif)
            r["image"] = f"images/{i}.jpg"
        else:
            im.resize(SIZES[i % len(SIZES)]).save(root / f"images/{i}.png")
            r["image"] = f"images/{i}.png"
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _text_positions(processor, messages, eos):
    """Assistant tokens of the rendered text: from the end of each turn's prompt to its end-of-turn token ``eos``
    (the templates write a space or newline after it, which belongs to no one's answer)."""
    def ids(msgs, gen):
        text = processor.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        return processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    positions = []
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            start, turn = len(ids(messages[:j], True)), ids(messages[: j + 1], False)
            end = max(k for k in range(start, len(turn)) if turn[k] == eos) + 1
            positions += range(start, end)
    return positions


def test_token_lengths_count_the_tokens_images_expand_to(vlm, data, tmp_path):
    model, model_type = vlm
    processor = AutoProcessor.from_pretrained(model)
    template = training_chat_template(processor, model_type)
    records = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    two = {**records[0], "id": "two-images", "image": [records[1]["image"], records[4]["image"]]}  # sizes differ
    two["conversations"] = [{"from": "human", "value": "<image>\nCompare with <image>: " + records[0]["conversations"][0]
                             ["value"].replace("<image>", "").strip()}, records[0]["conversations"][1]]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*records, two]))
    (tmp_path / "images").symlink_to(data / "images")
    rows, report, source = load_rows(str(tmp_path / "data.jsonl"))
    assert report.ok and rows[-1].images and len(rows[-1].images) == 2
    _token_lengths(rows, processor, template, report, False)
    text_only = [r.n_tokens for r in rows]
    _add_image_tokens(rows, processor, source, MAX_SIDE, template)
    collator = StageCollator(processor, template, MAX_SIDE, source=source)
    real = [int(collator([{"messages": r.messages, "images": r.images}])["attention_mask"].sum()) for r in rows]
    assert [r.n_tokens for r in rows] == real
    if model_type == "llava_next":
        assert all(n > t + 30 for n, t in zip(real, text_only, strict=True))  # the images are most of each row
    if model_type != "gemma3":  # the image's size sets how many tokens it takes
        assert len(set(n - t for n, t in zip(real, text_only, strict=True))) > 3
    else:  # 4 image tokens between begin/end-of-image tokens and blank lines, whatever the size
        added = [n - t for n, t in zip(real, text_only, strict=True)]
        assert len(set(added[:-1])) == 1 and real[0] > text_only[0] + 4
        assert added[-1] == 2 * added[0]  # the row with two images


def test_rows_over_max_length_only_with_their_image_tokens_are_dropped(llava, data, capsys):
    processor = AutoProcessor.from_pretrained(llava)
    template = training_chat_template(processor, "llava_next")
    rows, report, source = load_rows(str(data / "data.jsonl"))
    text = [r.n_tokens for r in _token_lengths(rows, processor, template, report, False)]
    collator = StageCollator(processor, template, MAX_SIDE, source=source)
    real = [int(collator([{"messages": r.messages, "images": r.images}])["attention_mask"].sum()) for r in rows]
    limit = sorted(real)[len(real) // 2]
    assert sum(n > limit for n in real) > sum(n > limit for n in text)  # text lengths alone would keep more
    args = ["train", "--model_name_or_path", str(llava), "--dataset", str(data / "data.jsonl"), "--dry_run",
            "--json", "--eval_split", "none", "--output_dir", str(data / "run"), "--max_length", str(limit)]
    assert main(args) == 0
    cut = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cut["too_long_dropped"] == sum(n > limit for n in real) and cut["tokens_max"] == max(real)


def test_label_positions_are_exactly_the_assistant_tokens(vlm, data):
    model, model_type = vlm
    processor = AutoProcessor.from_pretrained(model)
    template = training_chat_template(processor, model_type)
    rows, _, source = load_rows(str(data / "data.jsonl"))
    multi_turn = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<SUMMARY> a </SUMMARY>"}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<CONCLUSION> 4 </CONCLUSION>"}]}],
        "images": rows[1].images}
    two_images = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]}], "images": rows[2].images + rows[4].images}
    text_only = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]}], "images": []}
    examples = [{"messages": rows[0].messages, "images": rows[0].images}, multi_turn, two_images, text_only]
    stops = _eos_ids(AutoModelForImageTextToText.from_pretrained(model))  # as train passes them
    batch = StageCollator(processor, template, MAX_SIDE, source=source, stop_ids=stops)(examples)
    eos = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[model_type])
    for i, ex in enumerate(examples):
        # every image sits in the first turn: the assistant tokens move by what the images expanded to
        text = processor.apply_chat_template(ex["messages"], tokenize=False)
        shift = int(batch["attention_mask"][i].sum()) - len(processor.tokenizer(text, add_special_tokens=False)
                                                            ["input_ids"])
        assert shift > 0 or not ex["images"]
        want = [p + shift for p in _text_positions(processor, ex["messages"], eos)]
        got = (batch["labels"][i] != -100).nonzero().flatten().tolist()
        assert got == want, i
        assert torch.equal(batch["labels"][i][got], batch["input_ids"][i][got])
        assert batch["input_ids"][i][got[-1]] == eos  # the model learns to stop
    if model_type == "gemma3":  # images attend both ways in training: their tokens are typed, nothing else
        image_id = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
        assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == image_id).long())
        assert int(batch["token_type_ids"].sum()) == 4 * 4  # 4 tokens for each of the 4 images


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_other_vlms_train_and_evaluate(vlm, data, tmp_path, peft):
    from safetensors.torch import load_file

    model, model_type = vlm
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(model), "--dataset", str(data / "data.jsonl"),
                 "--output_dir", str(out), "--peft", peft, "--max_steps", "2", "--per_device_train_batch_size",
                 "2", "--eval_split", "3", "--stage_eval_samples", "3", "--stage_eval_max_new_tokens", "8",
                 "--dataloader_num_workers", "0", "--json"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval"]["samples"] == 3 and summary["eval_loss"] is not None
    if peft == "lora":  # the text decoder's projections, nothing of the vision tower
        saved = load_file(out / "adapter_model.safetensors")
        assert saved and all("language_model" in k for k in saved)
        assert {k.split(".")[-3] for k in saved} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}
        trained = [k for k, v in saved.items() if "lora_B" in k and v.abs().sum() > 0]  # lora_B starts at zero
        assert len(trained) == len(saved) // 2
    else:
        assert json.loads((out / "run_info.json").read_text())["model_type"] == model_type
        base, tuned = load_file(model / "model.safetensors"), load_file(out / "model.safetensors")
        assert tuned.keys() == base.keys()
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        # everything trains but what the model never runs: parts of the vision tower past the layer it takes
        # features from (LLaVA-NeXT's last layer norm, SigLIP's pooling head in Gemma 3)
        unused = {"llava_next": {"vision_tower.post_layernorm."}, "gemma3": {"vision_tower.head."}}.get(model_type, ())
        assert {k for k in base if not k.startswith(tuple(unused))} == changed


@pytest.mark.parametrize("name", ["mllama", *VLMS])
def test_the_filler_image_row_leaves_the_loss_unchanged(name, tiny_dir, request):
    # several processes: a batch without images gets a filler row with one, so that every process runs the vision
    # tower; it must not change the loss (its labels are -100, and Mllama's imageless rows ignore its image)
    from stagereason.modeling import load_model

    path = tiny_dir if name == "mllama" else request.getfixturevalue("llava" if name == "llava_next" else name)
    model, processor = load_model(path, dtype="fp32")
    model.eval()
    for p_name, p in model.named_parameters():  # trained gates, as in the real model (the tiny one starts at 0)
        if "cross_attn_attn_gate" in p_name or "cross_attn_mlp_gate" in p_name:
            p.data.fill_(0.7)
    template = training_chat_template(processor, name)
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": q}]},
                          {"role": "assistant", "content": [{"type": "text", "text": a}]}], "images": []}
            for q, a in [("2+2?", "<CONCLUSION> 4 </CONCLUSION>"), ("How many red circles?", "one red circle")]]
    plain = StageCollator(processor, template)(rows)
    filled = StageCollator(processor, template, vision_every_batch=True)(rows)
    assert "pixel_values" not in plain and "pixel_values" in filled and len(filled["input_ids"]) == 3
    assert (filled["labels"][0] == -100).all()  # the filler leads (rows with images first), unlabelled
    assert all((filled["labels"][k] != -100).any() for k in (1, 2))
    with torch.no_grad():
        want, got = model(**plain).loss, model(**filled).loss
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


def _end_at_stop_reference(labels, input_ids, stops):
    """Run by run, token by token: what follows a run's last end-of-turn token is cut."""
    for i in range(labels.shape[0]):
        row = (labels[i] != -100).tolist()
        j = 0
        while j < len(row):
            if not row[j]:
                j += 1
                continue
            k, last = j, None
            while k < len(row) and row[k]:
                if int(input_ids[i, k]) in stops.tolist():
                    last = k
                k += 1
            if last is not None:
                labels[i, last + 1:k] = -100
            j = k


def test_labelled_runs_end_at_their_last_end_of_turn_token():
    import random

    from stagereason.train.collate import _end_at_stop

    # two turns: "a b <eot> \n" labelled, then a prompt, then "c <eot> \n" labelled; <eot> = 9
    ids = torch.tensor([[5, 1, 2, 9, 7, 5, 5, 3, 9, 7, 0]])
    labels = torch.tensor([[-100, 1, 2, 9, 7, -100, -100, 3, 9, 7, -100]])
    _end_at_stop(labels, ids, torch.tensor([9]))
    assert labels.tolist() == [[-100, 1, 2, 9, -100, -100, -100, 3, 9, -100, -100]]
    rng = random.Random(0)
    for _ in range(500):
        b, t = rng.randint(1, 4), rng.randint(1, 30)
        ids = torch.randint(0, 6, (b, t), generator=torch.Generator().manual_seed(rng.randint(0, 10**6)))
        labels = ids.clone()
        labels[torch.rand(b, t, generator=torch.Generator().manual_seed(rng.randint(0, 10**6))) < rng.random()] = -100
        stops = torch.tensor(sorted(rng.sample(range(6), rng.randint(1, 2))))
        got, want = labels.clone(), labels.clone()
        _end_at_stop(got, ids, stops)
        _end_at_stop_reference(want, ids, stops)
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["mllama", *VLMS])
def test_vision_lora_adapts_every_linear_layer_of_each_vlms_vision_encoder(name, tiny_dir, request, tmp_path):
    # the vision encoders name their layers differently (Mllama q/k/v/o_proj + fc1/fc2, SigLIP out_proj, Qwen-VL
    # qkv/proj and gate/up/down_proj): --vision_lora must find them all in each, and nothing else of the tower
    from peft import get_peft_model

    from stagereason.modeling import vision_tower
    from stagereason.train.runner import TrainConfig, _peft_config

    path = tiny_dir if name == "mllama" else request.getfixturevalue("llava" if name == "llava_next" else name)
    model = AutoModelForImageTextToText.from_pretrained(path)
    tower = vision_tower(model)
    linears = {id(m) for m in tower.modules() if isinstance(m, torch.nn.Linear)}
    assert linears
    cfg = TrainConfig(model_name_or_path=str(path), dataset="d", output_dir=str(tmp_path), peft="lora",
                      vision_lora=True)
    wrapped = get_peft_model(model, _peft_config(cfg, model))
    adapted = {id(m.base_layer) for m in tower.modules() if hasattr(m, "lora_A")}
    assert adapted == linears
    text = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and "language_model" in n]
    assert text  # the text decoder keeps its own adapters
    cfg.vision_lora = False
    plain = get_peft_model(AutoModelForImageTextToText.from_pretrained(path), _peft_config(cfg, model))
    assert not any(hasattr(m, "lora_A") for m in vision_tower(plain).modules())


def test_vision_lora_on_a_model_without_a_vision_encoder_is_refused_by_name(tmp_path):
    from stagereason.train.runner import TrainConfig, _peft_config

    cfg = TrainConfig(model_name_or_path="text-model", dataset="d", output_dir=str(tmp_path), peft="lora",
                      vision_lora=True)
    text_only = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="--vision_lora: text-model has no vision encoder"):
        _peft_config(cfg, text_only)
