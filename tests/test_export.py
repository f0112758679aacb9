"""export: LoRA and QLoRA runs merged into full-precision weights equal to base + adapter; greedy output
equal under plain transformers; refusal to overwrite; a killed export leaves no directory.

Assets: the `test` tiny Mllama (conftest `tiny_dir`, stagereason.tiny), data from `stagereason gen`,
runs trained here with `stagereason train` (a few steps, so the adapters are not zero).
"""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from stagereason.cli import main


def _train(tiny_dir, data, out, peft):
    assert main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(data), "--output_dir", str(out),
                 "--peft", peft, "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "5e-2",
                 "--gradient_checkpointing", "false", "--eval_split", "none", "--lora_r", "4"]) == 0


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    assert main(["gen", "--out", str(root / "data"), "--n", "12", "--no_progress"]) == 0
    for peft in ("lora", "qlora", "none"):
        _train(tiny_dir, root / "data", root / peft, peft)
    return root


def _inputs(processor):
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True)
    return processor(images=[[Image.new("RGB", (40, 30), "blue")]], text=[text], add_special_tokens=False,
                     return_tensors="pt")


@pytest.mark.parametrize("peft", ["lora", "qlora"])
def test_merged_equals_base_plus_adapter(tiny_dir, runs, tmp_path, peft, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(runs / peft), "--out", str(out), "--dtype", "fp32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "adapter" and summary["max_abs_logit_diff"] < 1e-4
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    with_adapter = PeftModel.from_pretrained(base, str(runs / peft)).eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = _inputs(processor)
    with torch.no_grad():
        a, b = merged(**inputs).logits, with_adapter(**inputs).logits
        plain = AutoModelForImageTextToText.from_pretrained(tiny_dir)(**inputs).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - plain).abs().max() > 1e-3  # the adapter did something
    greedy = {k: v for k, v in inputs.items()}
    g1 = merged.generate(**greedy, max_new_tokens=10, do_sample=False)
    g2 = with_adapter.generate(**greedy, max_new_tokens=10, do_sample=False)
    assert torch.equal(g1, g2)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
            "tokenizer.json", "chat_template.jinja", "README.md", "export_info.json"} <= files
    card = (out / "README.md").read_text()
    assert "<SUMMARY>" in card and "AutoModelForImageTextToText" in card and "Reasoner.from_pretrained" in card


def test_bf16_export_loads_in_reasoner_and_full_finetune_converts(tiny_dir, runs, tmp_path, capsys):
    from stagereason.infer.reasoner import Reasoner

    assert main(["export", "--adapter", str(runs / "lora"), "--out", str(tmp_path / "bf16"), "--json"]) == 0
    capsys.readouterr()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    r = Reasoner.from_pretrained(tmp_path / "bf16", max_stage_tokens=3)
    assert r.answer(None, "2+2?", search="greedy").trace.ok
    assert main(["export", "--adapter", str(runs / "none"), "--out", str(tmp_path / "full"), "--dtype", "fp16",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "full"
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "full").dtype == torch.float16
    # a model dir that no train run wrote (here the base itself) is not relabelled as a fine-tune
    assert main(["export", "--adapter", str(tiny_dir), "--out", str(tmp_path / "base")]) == 1
    assert "not a stagereason train run dir" in capsys.readouterr().err and not (tmp_path / "base").exists()


def test_an_adapter_run_dir_alone_loads_in_the_reasoner(runs):
    from stagereason.infer.reasoner import Reasoner

    r = Reasoner.from_pretrained(runs / "qlora", max_stage_tokens=3)
    assert type(r.model).__name__.startswith("PeftModel")
    assert r.answer(None, "2+2?", search="greedy").trace.ok


def test_refuses_to_overwrite_and_force_replaces(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", "--adapter", str(runs / "lora"), "--out", str(out)]) == 1
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"
    assert main(["export", "--adapter", str(runs / "lora"), "--out", str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    assert main(["export", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_force_never_replaces_the_exports_own_input(tiny_dir, runs, tmp_path, capsys):
    import shutil

    run, base = tmp_path / "run", tmp_path / "base"
    shutil.copytree(runs / "lora", run)
    shutil.copytree(tiny_dir, base)
    before = {p.name for p in run.iterdir()}
    for args, named in ((["--adapter", str(run), "--out", str(run)], f"--adapter {run}"),
                        (["--adapter", str(run), "--out", str(tmp_path)], f"--adapter {run}"),
                        (["--adapter", str(run), "--base", str(base), "--out", str(base)], f"--base {base}")):
        assert main(["export", *args, "--force"]) == 1
        assert f"would replace this export's input ({named}" in capsys.readouterr().err
    assert {p.name for p in run.iterdir()} == before and (base / "config.json").is_file()


def test_an_adapter_whose_base_is_gone_is_named_and_infer_takes_the_recorded_base(tiny_dir, runs, tmp_path,
                                                                                   capsys):
    import shutil

    from stagereason.config import parse_config
    from stagereason.infer.run import InferConfig

    # infer --adapter alone: the base the run records, not the default --model
    (cfg,) = parse_config((InferConfig,), ["--adapter", str(runs / "lora"), "--question", "q"])
    assert cfg.model == str(tiny_dir)
    (cfg,) = parse_config((InferConfig,), ["--question", "q"])
    assert cfg.model == "runs/tiny-cpu"
    moved = tmp_path / "moved"
    shutil.copytree(runs / "lora", moved)
    for name, key in (("run_info.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        info = json.loads((moved / name).read_text())
        info[key] = str(tmp_path / "gone")
        (moved / name).write_text(json.dumps(info))
    assert main(["export", "--adapter", str(moved), "--out", str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err
    assert f"is an adapter on base model {tmp_path / 'gone'}, which cannot be loaded" in err and "--base" in err
    assert "Traceback" not in err and not (tmp_path / "merged").exists()
    assert main(["export", "--adapter", str(moved), "--base", str(tiny_dir), "--out", str(tmp_path / "merged")]) == 0


def test_an_export_killed_midway_leaves_no_directory(runs, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-m", "stagereason.cli", "export", "--adapter", str(runs / "lora"),
                             "--out", str(out), "--dtype", "fp32"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".merged.tmp-*")):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".merged.tmp-*")), "the kill should land while the export is under way"
    assert not out.exists()
    assert main(["export", "--adapter", str(runs / "lora"), "--out", str(out), "--dtype", "fp32"]) == 0
    assert (out / "model.safetensors").exists()


def test_an_adapter_loaded_on_another_base_than_its_own_is_warned_about(tiny_dir, runs, tmp_path, caplog):
    import shutil

    from stagereason.modeling import load_model

    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir, other)  # same shape, so PEFT takes the adapter without a word
    with caplog.at_level("WARNING", logger="stagereason.modeling"):
        load_model(tiny_dir, adapter=runs / "lora")
    assert "was trained on" not in caplog.text  # its own base: nothing to say
    with caplog.at_level("WARNING", logger="stagereason.modeling"):
        load_model(other, adapter=runs / "lora")
    assert f"adapter {runs / 'lora'} was trained on {tiny_dir} and is loaded on {other}" in caplog.text
