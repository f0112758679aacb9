"""train: exact label masks, loss equal to a hand-computed cross-entropy, QLoRA/LoRA/full updates,
invalid data before the model loads, dropped over-long rows, self-describing output, SIGKILL resume.

Assets: the `test` tiny Mllama (conftest `tiny_dir`, built by stagereason.tiny) and procedural data
written by `stagereason gen` (fixture `scenes` below); broken rows are written here.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoProcessor

from stagereason.cli import main
from stagereason.config import parse_config
from stagereason.infer.generate import fit_system_turns
from stagereason.train.collate import StageCollator
from stagereason.train.config import _accelerator_available
from stagereason.train.data import Row, load_rows
from stagereason.train.runner import TrainConfig, build_trainer, run_train
from stagereason.train.templates import training_chat_template
from stagereason.train.trainer import text_only_guesser

from .watch import watch_stderr


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """24 procedural examples written by `stagereason gen` (seed 0)."""
    out = tmp_path_factory.mktemp("scenes") / "data"
    assert main(["gen", "--out", str(out), "--n", "24", "--no_progress"]) == 0
    return out


def _cfg(tiny_dir, data, out, *flags):
    (cfg,) = parse_config((TrainConfig,), [
        "--model_name_or_path", str(tiny_dir), "--dataset", str(data), "--output_dir", str(out),
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--gradient_checkpointing", "false", "--eval_split", "4", "--stage_eval_samples", "2",
        "--stage_eval_max_new_tokens", "8", "--logging_steps", "1", "--save_steps", "100", *flags])
    return cfg


def _expected_label_positions(processor, messages):
    """Assistant tokens found independently: each assistant turn spans from the end of the prompt that
    precedes it (rendered with add_generation_prompt) to the end of the rendering that includes it."""
    def n_tokens(msgs, gen):  # a system turn in the form the model's template reads, as inference gives it
        text = processor.apply_chat_template(fit_system_turns(msgs, processor), add_generation_prompt=gen,
                                             tokenize=False)
        return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    positions = []
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            positions += range(n_tokens(messages[:j], True), n_tokens(messages[: j + 1], False))
    return positions


def test_label_positions_are_exactly_the_assistant_tokens(tiny_dir, scenes, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    rows, _, _ = load_rows(str(scenes))
    image = rows[0].images[0]
    multi_turn = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<SUMMARY> a </SUMMARY>"}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<CONCLUSION> 4 </CONCLUSION>"}]}],
        "images": [image]}
    two_images = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]}], "images": [image, rows[1].images[0]]}
    text_only = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]}], "images": []}
    with_system = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Answer in stages."}]}, *text_only["messages"]],
        "images": []}
    examples = [{"messages": rows[0].messages, "images": rows[0].images}, multi_turn, two_images, text_only,
                with_system]
    model_type = "mllama"
    collator = StageCollator(processor, training_chat_template(processor, model_type), 64, 507)
    batch = collator(examples)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    for i, ex in enumerate(examples):
        got = (batch["labels"][i] != -100).nonzero().flatten().tolist()
        assert got == _expected_label_positions(processor, ex["messages"]), i
        assert torch.equal(batch["labels"][i][got], batch["input_ids"][i][got])
        assert image_id not in batch["labels"][i].tolist()
        eot = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
        assert batch["input_ids"][i][got[-1]] == eot  # the model learns to stop
    assert (batch["input_ids"] == image_id).sum() == 4  # one, one, two, zero and zero images


@pytest.mark.parametrize("assistant_only", ["true", "false"])
def test_the_trainers_own_batches_label_exactly_the_assistant_tokens(tiny_dir, scenes, tmp_path, assistant_only):
    # the collator train builds for the run (its template, stop ids, vocabulary guard, image source), on its rows
    setup = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "run", "--assistant_only_loss", assistant_only))
    trainer, processor = setup.trainer, AutoProcessor.from_pretrained(tiny_dir)
    rows = [trainer.train_dataset[i] for i in range(5)]
    assert all(isinstance(ref, str) for r in rows for ref in r["images"])  # opened only when collated
    batch = trainer.data_collator(rows)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    for i, row in enumerate(rows):
        got = (batch["labels"][i] != -100).nonzero().flatten().tolist()
        if assistant_only == "true":
            assert got == _expected_label_positions(processor, row["messages"]), i
        else:  # every real token but the image token (outside the output vocabulary)
            real = batch["attention_mask"][i].bool() & (batch["input_ids"][i] != image_id)
            assert got == real.nonzero().flatten().tolist(), i
        assert torch.equal(batch["labels"][i][got], batch["input_ids"][i][got])
    assert trainer.args.assistant_only_loss == (assistant_only == "true")  # recorded as asked


def test_a_batch_whose_first_row_has_no_image_collates_and_generates(tiny_dir, scenes):
    # transformers' Mllama image processor (the torchvision one, used wherever torchvision is installed) takes
    # the image shape from the first row: a batch led by a row without an image failed with an IndexError.
    # Rows with images now lead; labels stay exact, and generated answers come back in the items' order.
    from stagereason.infer.generate import generate_greedy
    from stagereason.modeling import load_model, load_processor
    from stagereason.train.data import open_image

    processor = load_processor(tiny_dir)  # as train loads it: the PIL image backend, torchvision or not
    assert type(processor.image_processor).__name__ == "MllamaImageProcessorPil"
    rows, _, _ = load_rows(str(scenes))
    text_row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "4"}]}], "images": []}
    image_row = {"messages": rows[0].messages, "images": rows[0].images}
    batch = StageCollator(processor, training_chat_template(processor, "mllama"), 64, 507)([text_row, image_row])
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    assert [int((ids == image_id).sum()) for ids in batch["input_ids"]] == [1, 0]  # the image row leads
    for k, row in enumerate((image_row, text_row)):
        got = (batch["labels"][k] != -100).nonzero().flatten().tolist()
        assert got == _expected_label_positions(processor, row["messages"])
    model, processor = load_model(tiny_dir, dtype="fp32")
    items = [([], "2+2?"), ([open_image(rows[1].images[0])], "How many?"), ([], "3+3?")]
    together = generate_greedy(model, processor, items, max_new_tokens=6, batch_size=3)
    assert together == [generate_greedy(model, processor, [item], max_new_tokens=6)[0] for item in items]


def test_reported_loss_equals_hand_computed_cross_entropy(tiny_dir, scenes, tmp_path):
    setup = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "run", "--peft", "none"))
    trainer = setup.trainer
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), labels[keep])
    assert keep.sum() > 100
    assert torch.allclose(loss, manual, atol=1e-5), (loss, manual)


def _snapshot(model):
    """Bitwise copies of every parameter; 4-bit weights in their saved layout, with their block scales.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights into another layout at an
    inference forward and back at a save; the codes and scales stay the same, so those are compared.
    NaN != NaN, so packed storage is compared as bytes.
    """
    from bitsandbytes.nn import Params4bit

    out = {}
    for name, p in model.named_parameters():
        data = p.detach()
        if isinstance(p, Params4bit) and p.quant_state is not None:
            state = p.quant_state
            if getattr(state, "packing_format_for_cpu", False):  # the inverse of that repacking, on copies
                import copy

                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
            out[name + ".absmax"] = state.absmax.detach().float().clone()
        out[name] = data.contiguous().view(torch.uint8).flatten().clone()
    return out


def test_qlora_changes_only_lora_weights(tiny_dir, scenes, tmp_path):
    import bitsandbytes as bnb

    from stagereason.train.lora_dropout import DroppedInputLinear

    setup = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "run", "--peft", "qlora"))
    model = setup.trainer.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    lora_a = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    # the recipe's dropout (0.05) runs inside lora_A, which keeps no dropped copy of its input
    assert setup.trainer.lora_dropout_fused == len(lora_a) > 0
    assert all(type(m) is DroppedInputLinear and m.p == 0.05 for m in lora_a)
    assert setup.info["lean_lora_dropout_layers"] == len(lora_a)
    with torch.no_grad():  # an inference forward: on AVX512-BF16 CPUs bitsandbytes repacks the 4-bit weights
        model.eval()(**{k: v for k, v in next(iter(setup.trainer.get_train_dataloader())).items() if k != "labels"})
    before = _snapshot(model)
    assert any(n.endswith(".absmax") for n in before)
    setup.trainer.train()  # saves a checkpoint at its last step, which unpacks them again
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n in before if "lora_" in n}
    assert lora and changed == lora  # every adapter weight trained, and nothing else
    assert any("cross_attn" in n for n in changed)  # cross-attention is adapted too
    assert all("vision_model" not in n for n in lora)


def test_lean_lora_dropout_false_keeps_pefts_dropout(tiny_dir, scenes, tmp_path):
    setup = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "run", "--peft", "lora", "--lean_lora_dropout", "false"))
    model = setup.trainer.model
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(type(m) is torch.nn.Dropout and m.p == 0.05 for m in dropouts)
    assert setup.trainer.lora_dropout_fused == setup.info["lean_lora_dropout_layers"] == 0


def _vision_output_requires_grad(setup) -> bool:
    """Train one step and say whether the vision tower's projected output carried a graph."""
    seen = []
    model = setup.trainer.model
    projector = next(m for n, m in model.named_modules() if n.endswith("multi_modal_projector"))
    handle = projector.register_forward_hook(lambda module, inputs, output: seen.append(output.requires_grad))
    try:
        setup.trainer.train()
    finally:
        handle.remove()
    assert seen
    return any(seen)


@pytest.mark.parametrize("reentrant", ["false", "true"])
def test_frozen_vision_tower_records_no_graph_under_checkpointing(tiny_dir, scenes, tmp_path, reentrant):
    """SFTTrainer hooks every input embedding for PEFT + checkpointing; a frozen tower must not pay for it."""
    flags = ["--peft", "lora", "--gradient_checkpointing", "true", "--max_steps", "1",
             "--gradient_checkpointing_kwargs", f'{{"use_reentrant": {reentrant}}}']
    frozen = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "frozen", *flags))
    before = {n: p.detach().clone() for n, p in frozen.trainer.model.named_parameters() if "lora_" in n}
    assert not _vision_output_requires_grad(frozen)
    changed = [n for n, p in frozen.trainer.model.named_parameters() if "lora_" in n and not torch.equal(before[n], p)]
    assert changed  # the text LoRA still learns through the checkpointed layers
    trained = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "vision", *flags, "--vision_lora", "true"))
    assert _vision_output_requires_grad(trained)


def test_qlora_keeps_the_dtype_of_weights_it_does_not_quantize(tiny_dir, scenes, tmp_path):
    """Loading and wrapping as `train` does casts nothing (PEFT's prepare_model_for_kbit_training would cast every
    weight it does not quantize to float32)."""
    from peft import get_peft_model

    from stagereason.train.runner import _load, _peft_config

    cfg = _cfg(tiny_dir, scenes, tmp_path / "run", "--peft", "qlora")
    cfg.bf16 = True  # as on a GPU
    model, _ = _load(cfg, None)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert torch.bfloat16 in dtypes.values()
    wrapped = get_peft_model(model, _peft_config(cfg))
    base = {n.removeprefix("base_model.model."): p for n, p in wrapped.named_parameters() if "lora_" not in n}
    assert {n.replace(".base_layer", ""): p.dtype for n, p in base.items()} == dtypes
    assert not any(p.requires_grad for p in base.values())


def test_full_finetuning_changes_every_weight_that_gets_a_gradient(tiny_dir, scenes, tmp_path):
    setup = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "run", "--peft", "none"))
    model = setup.trainer.model
    before = _snapshot(model)
    setup.trainer.train()
    after = _snapshot(model)
    unchanged = sorted(n for n in before if torch.equal(before[n], after[n]))
    assert unchanged == []  # vision tower, projector, decoder, gates, embeddings and lm_head all trained


def test_frozen_vision_tower_keeps_its_weights_while_the_rest_trains(tiny_dir, scenes, tmp_path):
    setup = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "run", "--peft", "none", "--freeze_vision_tower", "true"))
    model = setup.trainer.model
    before = _snapshot(model)
    setup.trainer.train()
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    tower = {n for n in before if n.startswith("model.vision_model.")}
    assert tower and not tower & changed
    assert changed == set(before) - tower  # everything else trains as in full fine-tuning
    with pytest.raises(ValueError, match="--freeze_vision_tower and --vision_lora"):
        _cfg(tiny_dir, scenes, tmp_path / "other", "--freeze_vision_tower", "true", "--vision_lora", "true")


@pytest.mark.skipif(_accelerator_available(), reason="the refusal is for machines without a GPU")
def test_activation_offloading_without_a_gpu_is_refused_before_the_model_loads(tiny_dir, scenes, tmp_path, capsys):
    assert main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(scenes),
                 "--output_dir", str(tmp_path / "run"), "--activation_offloading", "true"]) != 0
    assert "--activation_offloading moves activations from the GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,match", [
    (["--packing", "true"], "--packing: TRL does not pack rows with images together"),
    (["--padding_free", "true"], "--padding_free: TRL does not train rows with images padding-free"),
    (["--report_to", "tensorboard"], r"--report_to tensorboard: its package is not installed \(pip install"),
    (["--metric_for_best_model", "acuracy"], r"no evaluation logs it \(did you mean 'accuracy'\?\)"),
    (["--metric_for_best_model", "eval_accuracy", "--stage_eval_samples", "0"],
     "the stage-aware evaluation that logs it is off"),
    (["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--save_strategy", "steps",
      "--eval_split", "none"], "--load_best_model_at_end needs held-out rows"),
    (["--peft", "none", "--vision_lora", "true"], "--vision_lora adds LoRA to the vision encoder, and --peft none"),
    (["--eval_split", "nan"], "--eval_split nan: a fraction below 1, a row count, a dataset path, or none"),
])
def test_options_the_trainer_would_refuse_late_are_refused_before_the_model_loads(tiny_dir, scenes, tmp_path,
                                                                                  monkeypatch, flags, match):
    # each failed (or did nothing) only once the model had loaded, or after training had started
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=match):
        _cfg(tiny_dir, scenes, tmp_path / "run", *flags)


def test_the_replacements_named_for_removed_training_options_exist():
    from stagereason.config import RENAMED

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for old, new in RENAMED.items():
        assert old not in fields and new.split()[0].removeprefix("--") in fields, (old, new)


def test_options_the_cpu_cannot_honour_are_named(tiny_dir, scenes, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("about machines without a GPU")
    for flags in (["--bf16", "true"], ["--bf16"]):  # bare, as the plain boolean flags take it (it is `bool | None`)
        caplog.clear()
        with caplog.at_level("WARNING", logger="stagereason.train.config"):
            cfg = _cfg(tiny_dir, scenes, tmp_path / "run", *flags)
        assert not cfg.bf16 and "--bf16 is ignored: no GPU is visible" in caplog.text
    assert not _cfg(tiny_dir, scenes, tmp_path / "run", "--bf16", "false").bf16
    # --max_steps 0 trains by epochs (transformers took it as one step at learning rate 0)
    cfg = _cfg(tiny_dir, scenes, tmp_path / "run", "--max_steps", "0", "--num_train_epochs", "0.5")
    assert cfg.max_steps == -1 and cfg.num_train_epochs == 0.5


def test_the_summary_describes_the_best_checkpoint_when_it_is_loaded_at_the_end(tiny_dir, scenes, tmp_path):
    # the best checkpoint by eval_loss, higher being "better" here, is the first one; its weights are what the
    # run saves, so the summary's evaluation must be of those weights, not of the last evaluation's
    out = tmp_path / "run"
    summary = run_train(_cfg(tiny_dir, scenes, out, "--peft", "lora", "--max_steps", "4", "--eval_strategy", "steps",
                             "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
                             "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss",
                             "--greater_is_better", "true"))
    logged = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    at = {h["step"]: h["eval_loss"] for h in logged if "eval_loss" in h}
    assert at[2] > at[4] and summary["best_model_checkpoint"].endswith("checkpoint-2")
    assert summary["best_metric"] == at[2]
    assert summary["eval_loss"] == pytest.approx(at[2], rel=1e-6)  # the saved (best) weights evaluated again
    assert summary["eval"]["format_rate"] is not None


def test_run_dir_describes_itself(tiny_dir, scenes, tmp_path, capsys, monkeypatch):
    from stagereason.train import rundir

    plotted = []
    plot = rundir._plot_loss
    monkeypatch.setattr(rundir, "_plot_loss", lambda history, path: (plotted.extend(history), plot(history, path)))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(scenes), "--output_dir", str(out),
                 "--peft", "lora", "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--gradient_checkpointing", "false", "--eval_split", "4", "--stage_eval_samples", "2",
                 "--stage_eval_max_new_tokens", "8", "--logging_steps", "1", "--json"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "train_config.yaml", "run_info.json", "train_summary.json", "loss.png",
            "eval_samples.jsonl"} <= files
    summary = json.loads((out / "train_summary.json").read_text())
    # the loss curve is the run's logged losses, and the summary's final loss is the last of them
    losses = [(h["step"], h["loss"]) for h in plotted if "loss" in h]
    assert [step for step, _ in losses] == [1, 2] and summary["final_train_loss"] == losses[-1][1]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["steps"] == 2 and summary["train_samples"] == 8 and summary["processes"] == 1
    assert summary["samples_per_s"] == pytest.approx(8 / summary["train_runtime_s"], rel=0.01)
    assert summary["train_tokens"] > 8 * 100  # every row has its image token, prompt and staged answer
    assert summary["tokens_per_s"] == pytest.approx(summary["train_tokens"] / summary["train_runtime_s"], rel=0.01)
    assert summary["peak_memory_gb"] > 0 and summary["eval_runtime_s"] > 0
    # the stage-aware evaluation is what eval_samples.jsonl holds: 2 generated answers, scored
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == summary["eval"]["samples"] == 2
    assert summary["eval"]["format_rate"] == sum(s["format_ok"] for s in samples) / 2
    assert summary["eval"]["accuracy"] == sum(s["correct"] for s in samples) / 2
    assert 0 <= summary["eval"]["text_only_accuracy"] <= 1 and summary["eval_loss"] is not None
    info = json.loads((out / "run_info.json").read_text())
    assert info["base_model"] == str(tiny_dir) and info["peft"] == "lora" and info["precision"] == "fp32"
    assert info["processes"] == 1 and info["distributed"] == "NO"
    assert {"torch", "transformers", "trl", "peft"} <= set(info["versions"])
    (cfg,) = parse_config((TrainConfig,), ["--config", str(out / "train_config.yaml")])  # reloadable
    assert cfg.peft == "lora" and cfg.max_steps == 2
    saved = (out / "train_config.yaml").read_text()
    assert "_TOKEN>" not in saved and "&id" not in saved  # no placeholders read back as tokens, no YAML aliases
    (cfg,) = parse_config((TrainConfig,), ["--config", str(out / "train_config.yaml"), "--gradient_checkpointing"])
    assert cfg.gradient_checkpointing and cfg.activation_checkpointing  # the flag wins over the saved file
    (cfg,) = parse_config((TrainConfig,), ["--config", str(out / "train_config.yaml"), "--max_steps", "1",
                                           "--output_dir", str(tmp_path / "rerun")])
    assert cfg.eos_token is None and cfg.pad_token is None and cfg.hub_token is None
    capsys.readouterr()
    assert main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(scenes),
                 "--output_dir", str(out)]) == 1
    assert "is not empty; pass --resume_from_checkpoint auto" in capsys.readouterr().err


def test_a_run_given_relative_paths_loads_from_anywhere_and_a_finished_run_is_not_trained_again(
        tiny_dir, scenes, tmp_path, capsys, monkeypatch):
    import hashlib
    import shutil

    from stagereason.infer.reasoner import Reasoner

    work = tmp_path / "work"
    shutil.copytree(tiny_dir, work / "tiny")
    shutil.copytree(scenes, work / "data")
    monkeypatch.chdir(work)
    args = ["train", "--model_name_or_path", "tiny", "--dataset", "data", "--output_dir", "run", "--peft", "lora",
            "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "4",
            "--gradient_checkpointing", "false", "--eval_split", "none", "--logging_steps", "1", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(out)  # standard output is the JSON object alone (the trainer's own prints go to stderr)
    assert summary["steps"] == 2
    run = work / "run"
    info = json.loads((run / "run_info.json").read_text())
    adapter = json.loads((run / "adapter_config.json").read_text())
    saved = yaml.safe_load((run / "train_config.yaml").read_text())
    assert info["base_model"] == adapter["base_model_name_or_path"] == saved["model_name_or_path"] == str(work / "tiny")
    assert info["dataset"] == saved["dataset"] == str(work / "data") and saved["output_dir"] == str(run)
    # elsewhere, and where another folder is called tiny: the run still loads its own base
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tiny").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert Reasoner.from_pretrained(run, max_stage_tokens=3).model.base_model.model.name_or_path == str(work / "tiny")
    (cfg,) = parse_config((TrainConfig,), ["--config", str(run / "train_config.yaml")])
    assert cfg.dataset == str(work / "data")
    # the same command again, resuming: the run has reached its last step, so nothing trains or changes
    monkeypatch.chdir(work)
    digest = {p.relative_to(run): hashlib.sha1(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    assert main([*args, "--resume_from_checkpoint", "auto"]) == 0
    captured = capsys.readouterr()
    assert "nothing to do: run holds this run, finished at step 2" in captured.err
    assert json.loads(captured.out) == json.loads((run / "train_summary.json").read_text())
    assert digest == {p.relative_to(run): hashlib.sha1(p.read_bytes()).hexdigest() for p in run.rglob("*")
                      if p.is_file()}
    # asked for more steps, it trains on from there
    assert main([*args, "--resume_from_checkpoint", "auto", "--max_steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3


def test_the_saved_config_gives_back_the_pad_and_eos_tokens_and_keeps_the_hub_token_secret(tmp_path):
    from stagereason.config import dump_config

    args = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", str(tmp_path / "run")]
    (cfg,) = parse_config((TrainConfig,), [*args, "--pad_token", "<|finetune_right_pad_id|>", "--eos_token",
                                           "<|eot_id|>", "--hub_token", "hf_secret"])
    dump_config((cfg,), tmp_path / "train_config.yaml")
    saved = (tmp_path / "train_config.yaml").read_text()
    assert "hf_secret" not in saved and "_TOKEN>" not in saved  # transformers' placeholders are not tokens
    (back,) = parse_config((TrainConfig,), ["--config", str(tmp_path / "train_config.yaml")])
    assert (back.pad_token, back.eos_token, back.hub_token) == ("<|finetune_right_pad_id|>", "<|eot_id|>", None)
    (plain,) = parse_config((TrainConfig,), args)  # what --dry_run prints: the values, None where unset
    assert {k: plain.to_dict()[k] for k in ("pad_token", "eos_token", "hub_token")} == dict.fromkeys(
        ("pad_token", "eos_token", "hub_token"))


def test_the_python_api_trains_as_the_verb_does(tiny_dir, scenes, tmp_path):
    import stagereason.train as api

    assert api.TrainConfig is TrainConfig and api.run_train is run_train
    common = dict(model_name_or_path=str(tiny_dir), dataset=str(scenes), max_steps=2, per_device_train_batch_size=4,
                  stage_eval_max_new_tokens=8, gradient_checkpointing=False)
    summary = api.run_train(api.TrainConfig(output_dir=str(tmp_path / "run"), peft="lora", eval_split=4,
                                            stage_eval_samples=2, **common))
    assert summary == {**json.loads((tmp_path / "run" / "train_summary.json").read_text()), "dataset": summary["dataset"]}
    assert summary["steps"] == 2 and summary["eval"]["samples"] == 2 and summary["dataset"]["eval_rows"] == 4
    summary = api.run_train(api.TrainConfig(output_dir=str(tmp_path / "none"), peft="none", eval_split=None,
                                            **common))
    assert summary["eval"] is None and summary["dataset"]["train_rows"] == 24
    with pytest.raises(ValueError, match="--packing"):  # the checks the verb makes, made here too
        api.TrainConfig(output_dir=str(tmp_path / "p"), packing=True, **common)


def test_rows_and_options_the_first_batch_or_evaluation_would_fail_on_are_refused_before_the_model_loads(
        tiny_dir, scenes, tmp_path, capsys, monkeypatch):
    from stagereason.train import runner

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "_load", no_model)
    rows = [json.loads(x) for x in (scenes / "data.jsonl").read_text().splitlines()]
    rows[2]["conversations"][0]["value"] = "<|image|>" + rows[2]["conversations"][0]["value"]  # a second image token
    gpt = rows[3]["conversations"][1]  # would end the turn early, the rest outside the labels
    gpt["value"] = gpt["value"].replace(" </REASONING>", " <|eot_id|> </REASONING>")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "images").symlink_to(scenes / "images")
    args = ["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(data), "--output_dir",
            str(tmp_path / "run"), "--eval_split", "none"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"row {rows[2]['id']}: special token: turn 1 (user) holds '<|image|>', one of the model's special" in err
    assert f"row {rows[3]['id']}: special token: turn 2 (assistant) holds '<|eot_id|>'" in err
    assert main([*args, "--skip_invalid", "--dry_run", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["invalid_dropped"] == 2 and summary["train_rows"] == len(rows) - 2
    # special tokens that give a row no structure are data (tool calls, grounding boxes): kept
    from transformers import AutoProcessor

    from stagereason.modeling import structural_special_tokens
    from stagereason.train.templates import training_chat_template

    processor = AutoProcessor.from_pretrained(tiny_dir)
    pattern = structural_special_tokens(processor, training_chat_template(processor, "mllama"))
    assert pattern.search("<|eot_id|>") and pattern.search("<|image|>") and pattern.search("<|begin_of_text|>")
    assert "<|python_tag|>" in processor.tokenizer.all_special_tokens or any(
        t.content == "<|python_tag|>" and t.special for t in processor.tokenizer.added_tokens_decoder.values())
    assert not pattern.search("<|python_tag|>print(1)")
    # an evaluation asked for with no held-out rows: refused now, not at the first evaluation
    assert main([*args, "--skip_invalid", "--eval_strategy", "steps"]) == 1
    assert "--eval_strategy steps needs held-out rows, and there are none (--eval_split is none)" in \
        capsys.readouterr().err
    # a model that is not there is named before the dataset is read
    assert main(["train", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset", str(tmp_path / "nodata"),
                 "--output_dir", str(tmp_path / "run")]) == 1
    assert f"--model_name_or_path {tmp_path / 'no-model'} is neither a local model directory" in \
        capsys.readouterr().err


def test_stage_evaluation_answers_a_multi_turn_row_with_its_earlier_turns(tiny_dir, scenes, tmp_path, monkeypatch):
    from stagereason.infer import generate

    rows = [json.loads(x) for x in (scenes / "data.jsonl").read_text().splitlines()]
    held = [dict(r) for r in rows[:2]]
    for r in held:  # a first exchange, then the question asked again in other words
        r["conversations"] = [*r["conversations"], {"from": "human", "value": "Say it once more."},
                              r["conversations"][1]]
    (tmp_path / "images").symlink_to(scenes / "images")
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    asked = []
    real = generate.generate_greedy

    def spy(model, processor, items, **kwargs):
        asked.extend(items)
        return real(model, processor, items, **kwargs)

    monkeypatch.setattr(generate, "generate_greedy", spy)
    setup = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "run", "--eval_split", str(tmp_path / "held.jsonl")))
    metrics = setup.trainer.stage_eval()
    assert len(asked) == 2 and 0 <= metrics["format_rate"] <= 1
    for (images, prompt), row in zip(asked, setup.trainer.stage_rows, strict=True):
        assert len(images) == 1 and prompt == row.messages[:3]  # user, assistant, user: all but the last answer
        assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
        assert prompt[2]["content"] == [{"type": "text", "text": "Say it once more."}]


def test_a_separate_eval_set_takes_its_own_image_root(tiny_dir, scenes, tmp_path):
    rows = [json.loads(x) for x in (scenes / "data.jsonl").read_text().splitlines()]
    (tmp_path / "lists").mkdir()
    held = tmp_path / "lists" / "held.jsonl"  # its image paths are relative to the scenes folder, not to its own
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    train = tmp_path / "train.jsonl"  # the other rows, images beside it
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    (tmp_path / "images").symlink_to(scenes / "images")
    with pytest.raises(ValueError, match="missing image"):
        build_trainer(_cfg(tiny_dir, train, tmp_path / "run", "--eval_split", str(held), "--dry_run", "true"))
    setup = build_trainer(_cfg(tiny_dir, train, tmp_path / "run", "--eval_split", str(held), "--eval_image_root",
                               str(scenes), "--dry_run", "true"))
    assert setup.data["eval_rows"] == 3 and setup.data["train_rows"] == len(rows) - 3


def test_invalid_dataset_fails_before_the_model_loads(tiny_dir, scenes, tmp_path, capsys):
    import shutil

    weightless = tmp_path / "weightless"  # its config and processor read, but no weights to load
    shutil.copytree(tiny_dir, weightless)
    (weightless / "model.safetensors").unlink()
    lines = (scenes / "data.jsonl").read_text().splitlines()
    bad = [json.loads(x) for x in lines[:6]]
    bad[1]["image"] = "images/missing.png"
    bad[3]["conversations"][1]["value"] = "<SUMMARY> only </SUMMARY>"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bad))
    (tmp_path / "images").symlink_to(scenes / "images")
    args = ["train", "--model_name_or_path", str(weightless), "--dataset", str(data),
            "--output_dir", str(tmp_path / "run")]
    assert main(args) == 1  # the data is checked first: the missing weights are never reached
    err = capsys.readouterr().err
    assert "2 invalid row(s)" in err and bad[1]["id"] in err and bad[3]["id"] in err and "--skip_invalid" in err
    assert not (tmp_path / "run").exists()


def test_skip_invalid_and_over_long_rows_are_dropped_and_counted(tiny_dir, scenes, tmp_path, capsys):
    lines = (scenes / "data.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    rows[0]["image"] = "images/missing.png"
    rows[2]["conversations"][1]["value"] = rows[2]["conversations"][1]["value"].replace(
        "</REASONING>", " more" * 300 + " </REASONING>")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "images").symlink_to(scenes / "images")
    assert main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(data), "--dry_run",
                 "--skip_invalid", "--max_length", "400", "--eval_split", "none", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["invalid_dropped"] == 1 and summary["too_long_dropped"] == 1
    assert summary["train_rows"] == 22 and summary["tokens_max"] > 400
    # held-out rows are neither training rows nor dropped ones
    assert main(["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(data), "--dry_run",
                 "--skip_invalid", "--max_length", "400", "--eval_split", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["too_long_dropped"] == 1
    assert summary["train_rows"] + summary["eval_rows"] == 22


def test_max_length_keeps_rows_of_exactly_that_length_whole_and_drops_longer_ones(tiny_dir, scenes, tmp_path):
    def built(name, *flags):
        trainer = build_trainer(_cfg(tiny_dir, scenes, tmp_path / name, "--eval_split", "none", *flags)).trainer
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        collated = [int(trainer.data_collator([r])["attention_mask"].sum()) for r in rows]
        assert collated == [r["length"] for r in rows]  # the counted lengths are what the model gets
        return sorted(collated)

    every = built("all")
    limit = every[len(every) // 2]
    assert every[0] < limit < every[-1]
    assert built("cut", "--max_length", str(limit)) == [n for n in every if n <= limit]  # none cut short
    with pytest.raises(ValueError, match=f"no training rows left .* longer than max_length {every[0] - 1}: 24"):
        build_trainer(_cfg(tiny_dir, scenes, tmp_path / "none", "--eval_split", "none",
                           "--max_length", str(every[0] - 1)))


def test_the_rates_count_the_rows_and_tokens_trained_on(tiny_dir, scenes, tmp_path):
    # 20 training rows in micro-batches of 3, two per step: the last step holds one micro-batch of 2 rows, so
    # steps x batch x accumulation (24) overstates what trained; the rows and tokens are counted as they train
    setup = build_trainer(_cfg(tiny_dir, scenes, tmp_path / "run", "--peft", "lora", "--max_steps", "-1",
                               "--num_train_epochs", "1", "--per_device_train_batch_size", "3",
                               "--gradient_accumulation_steps", "2"))
    setup.trainer.train()
    assert setup.trainer.state.global_step == 4 and len(setup.trainer.train_dataset) == 20
    logged = [h["num_tokens"] for h in setup.trainer.state.log_history if "num_tokens" in h][-1]
    assert setup.trainer.seen() == (20, logged)  # TRL's own count of the non-padding tokens, one process
    assert setup.trainer.eval_seconds == 0.0  # no evaluation ran during training
    # under a launcher a batch without an image gets a filler row: trained through, but not counted
    text_row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "How many circles?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "<CONCLUSION> 2 </CONCLUSION>"}]}],
                "images": []}
    collator = dataclasses.replace(setup.trainer.data_collator, vision_every_batch=True)
    alone, filled = setup.trainer.data_collator([text_row]), collator([text_row])
    assert len(filled["input_ids"]) == 2
    setup.trainer.training_step(setup.trainer.model, filled)
    assert setup.trainer.seen() == (21, logged + int(alone["attention_mask"].sum()))


def test_sigkill_mid_training_then_resume_reaches_the_same_final_step(tiny_dir, scenes, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "stagereason.cli", "train", "--model_name_or_path", str(tiny_dir),
           "--dataset", str(scenes), "--output_dir", str(out), "--peft", "none", "--max_steps", "40",
           "--per_device_train_batch_size", "2", "--save_steps", "5", "--gradient_checkpointing", "false",
           "--eval_split", "none", "--logging_steps", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoint-10").is_dir():
        time.sleep(0.01)  # killed as checkpoint-10 is being written: fast machines finish 40 steps in seconds
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-10").is_dir() and not (out / "train_summary.json").exists()
    res = subprocess.run(cmd + ["--resume_from_checkpoint", "auto"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    assert summary["steps"] == 40 and os.path.basename(info["resumed_from"]).startswith("checkpoint-")
    first = summary["resumed_from_step"]
    assert first in (5, 10) and summary["train_samples"] == (40 - first) * 2  # this run's rows only
    # the same run without the kill: the resumed steps see the same rows with the same optimizer state
    ref = tmp_path / "ref"
    res = subprocess.run([*cmd[:cmd.index("--output_dir") + 1], str(ref), *cmd[cmd.index("--output_dir") + 2:]],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]

    def losses(run):
        history = json.loads((run / "checkpoint-40/trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["loss"] for h in history if "loss" in h}

    resumed, whole = losses(out), losses(ref)
    assert sorted(resumed) == sorted(whole) == list(range(1, 41))
    assert all(resumed[k] == whole[k] for k in range(first + 1, 41)), (first, resumed, whole)
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_full_finetuning_loads_the_trained_weights_not_the_base(tiny_dir, scenes, tmp_path):
    # full weights are saved under the checkpoint format's names (language_model.model.*), not the model's own
    # (model.language_model.*): loaded as they are, nothing would load and training would restart from the base
    out = tmp_path / "run"
    first = build_trainer(_cfg(tiny_dir, scenes, out, "--peft", "none", "--max_steps", "2", "--save_steps", "2"))
    first.trainer.train()
    trained = {k: v.detach().clone() for k, v in first.trainer.model.state_dict().items()}
    second = build_trainer(_cfg(tiny_dir, scenes, out, "--peft", "none", "--max_steps", "3",
                                "--resume_from_checkpoint", "auto"))
    assert second.resume == str(out / "checkpoint-2")
    model = second.trainer.model
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(base[k], trained[k]) for k in trained)
    second.trainer._load_from_checkpoint(second.resume)
    loaded = model.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    # a checkpoint of another kind or of another model is named before anything trains
    with pytest.raises(ValueError, match="holds full weights .* and this run is --peft lora"):
        build_trainer(_cfg(tiny_dir, scenes, out, "--peft", "lora", "--resume_from_checkpoint", "auto"))
    with pytest.raises(ValueError, match="saved from another model"):
        _load_shrunk(second.trainer.model, out / "checkpoint-2", tmp_path)


def _load_shrunk(model, ckpt, tmp_path):
    """Load ``ckpt`` with one weight cut short: as a checkpoint of another model would be."""
    import shutil

    from safetensors.torch import load_file, save_file

    from stagereason.train.trainer import _load_full_weights

    bad = tmp_path / "bad-ckpt"
    shutil.copytree(ckpt, bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["language_model.lm_head.weight"] = weights["language_model.lm_head.weight"][:-1].contiguous()
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _load_full_weights(model, bad)


def test_auto_resume_skips_a_checkpoint_cut_short_while_saving(tmp_path):
    from stagereason.train.rundir import last_complete_checkpoint

    for step, state in ((5, '{"global_step": 5}'), (10, '{"global_st'), (15, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")


def test_fast_assistant_mask_equals_trls_own(tiny_dir, scenes):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    rows, _, _ = load_rows(str(scenes))
    collator = StageCollator(processor, training_chat_template(processor, "mllama"), 64, 507)
    examples = [{"messages": r.messages, "images": r.images} for r in rows[:6]]
    fast = collator(examples)
    collator._assistant_mask = lambda *a: None  # as when a processor expands image tokens
    slow = collator(examples)
    assert torch.equal(fast["labels"], slow["labels"]) and torch.equal(fast["input_ids"], slow["input_ids"])


def test_repeated_ids_are_distinct_rows_not_errors(scenes, tmp_path):
    rows = [json.loads(x) for x in (scenes / "data.jsonl").read_text().splitlines()[:3]]
    rows[1]["id"] = rows[2]["id"] = rows[0]["id"]  # one image, several questions
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "images").symlink_to(scenes / "images")
    loaded, report, _ = load_rows(str(data))
    rid = rows[0]["id"]
    assert [r.id for r in loaded] == [rid, f"{rid}#1", f"{rid}#2"] and report.ok
    assert report.repeated_ids == {rid: 3}
    # a broken repeat is dropped by its own name; the good rows with the same id stay
    rows[1]["conversations"][1]["value"] = "no tags at all"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded, report, _ = load_rows(str(data), skip_invalid=True)
    assert list(report.problems) == [f"{rid}#1"] and [r.id for r in loaded] == [rid, f"{rid}#2"]


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 400), w=st.integers(1, 400), most=st.integers(1, 4))
def test_fit_tiles_gives_at_most_the_asked_tiles(h, w, most):
    """Checked against Mllama's own processor: the real tiles of a fitted image never exceed the cap."""
    from PIL import Image
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from stagereason.train.data import fit_tiles

    processor = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)
    image = Image.new("RGB", (w, h), "red")
    fitted = fit_tiles(image, 56, most)
    out = processor(images=[[fitted]], return_tensors="pt")
    assert out["pixel_values"].shape[2] == 4  # still padded to the model's own tile count
    assert 1 <= int(out["aspect_ratio_mask"].sum()) <= most
    canvases = [(r, c) for r in range(1, most + 1) for c in range(1, most + 1) if r * c <= most]
    fits = any(r * 56 >= h and c * 56 >= w for r, c in canvases)
    assert (fitted is image) == fits  # shrunk only when no canvas of at most `most` tiles holds it
    if not fits:  # and then just enough: it fills a canvas of at most `most` tiles on one side (to a pixel)
        assert any(fitted.height <= r * 56 and fitted.width <= c * 56
                   and (r * 56 - fitted.height <= 1 or c * 56 - fitted.width <= 1) for r, c in canvases)


def test_max_image_tiles_on_a_model_without_tiles_is_refused(scenes, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                vocab_size=16).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="does not cut images into tiles"):
        build_trainer(_cfg(tmp_path / "m", scenes, tmp_path / "run", "--max_image_tiles", "2"))


def test_max_image_tiles_below_the_models_trains(tiny_dir, tmp_path):
    """A 2-tile model told to use 1 tile per image: images shrink, inputs keep the model's shape."""
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (64, 30), "blue").save(data / "images" / "wide.png")  # two tiles of 32px unshrunk
    row = {"id": "w", "image": "images/wide.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"},
        {"from": "gpt", "value": "<SUMMARY> s </SUMMARY>\n\n<CAPTION> c </CAPTION>\n\n<REASONING> r </REASONING>"
                                 "\n\n<CONCLUSION> blue </CONCLUSION>"}]}
    (data / "data.jsonl").write_text("".join(json.dumps({**row, "id": f"w{i}"}) + "\n" for i in range(4)))
    setup = build_trainer(_cfg(tiny_dir, data, tmp_path / "run", "--max_image_tiles", "1", "--eval_split", "none",
                               "--max_steps", "1"))
    batch = setup.trainer.data_collator([setup.trainer.train_dataset[0]])
    assert batch["aspect_ratio_mask"].sum() == 1 and batch["pixel_values"].shape[2] == 2
    setup.trainer.train()
    assert setup.trainer.state.global_step == 1
    with pytest.raises(ValueError, match="--max_image_tiles 3"):
        build_trainer(_cfg(tiny_dir, data, tmp_path / "run3", "--max_image_tiles", "3", "--eval_split", "none"))


@pytest.mark.parametrize("flags,on,reentrant", [
    ([], True, False), (["--gradient_checkpointing", "false"], False, False),
    (["--activation_checkpointing", "false"], False, False),
    (["--gradient_checkpointing_kwargs", '{"use_reentrant": true}'], True, True)])
def test_checkpointing_flags_both_names_without_deprecation_warnings(flags, on, reentrant):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*deprecated")
        (cfg,) = parse_config((TrainConfig,), ["--output_dir", "unused", *flags])
    assert cfg.activation_checkpointing is on and cfg.gradient_checkpointing is on
    assert cfg.activation_checkpointing_kwargs["use_reentrant"] is reentrant


def _hf_dir(path, rows):
    """A save_to_disk dataset in the LLaVA-CoT layout with decoded images (an Image feature)."""
    import datasets
    from PIL import Image

    datasets.Dataset.from_dict({
        "id": [r[0] for r in rows],
        "image": [Image.new("RGB", (40, 30), r[1]) for r in rows],
        "conversations": [[{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": r[2]}]
                          for r in rows],
    }).cast_column("image", datasets.Image()).save_to_disk(str(path))
    return path


def _trace(answer):
    return (f"<SUMMARY> s </SUMMARY>\n\n<CAPTION> c </CAPTION>\n\n<REASONING> r </REASONING>\n\n"
            f"<CONCLUSION> {answer} </CONCLUSION>")


def test_hf_rows_with_repeated_ids_drop_the_bad_one_not_the_good_one(tmp_path):
    data = _hf_dir(tmp_path / "hf", [("x", "red", _trace("red")), ("x", "blue", "no tags at all")])
    rows, report, _ = load_rows(str(data), skip_invalid=True)
    assert list(report.problems) == ["x#1"]
    assert [r.id for r in rows] == ["x"] and rows[0].answer == "red"


def test_separate_hf_eval_dataset_resolves_its_own_images(tmp_path):
    from stagereason.train.data import open_image, split_rows

    train = _hf_dir(tmp_path / "train", [("t0", "red", _trace("red")), ("t1", "red", _trace("red"))])
    held = _hf_dir(tmp_path / "eval", [("e0", "blue", _trace("blue"))])
    rows, _, source = load_rows(str(train))
    _, eval_rows = split_rows(rows, str(held), 0, None, source)
    color = open_image(source(eval_rows[0].images[0]), None).getpixel((0, 0))
    assert color == (0, 0, 255)  # the eval dataset's blue image, not the training set's red one
    assert open_image(source(rows[0].images[0]), None).getpixel((0, 0)) == (255, 0, 0)


def test_a_corrupt_hf_image_met_while_collating_names_its_row(tiny_dir, tmp_path):
    import io

    import datasets
    from PIL import Image

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}

    turns = [{"from": "human", "value": "<image><image>\nSame color?"}, {"from": "gpt", "value": _trace("yes")}]
    datasets.Dataset.from_dict(
        {"id": ["a", "b"], "image": [[png("red"), png("red")], [png("blue"), {"bytes": b"not an image",
                                                                             "path": "shots/b2.jpg"}]],
         "conversations": [turns, turns]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.List(datasets.Image()),
                                    "conversations": datasets.List({"from": datasets.Value("string"),
                                                                    "value": datasets.Value("string")})}),
    ).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"b: image: image hf:1:1 \(row 1, image 1\) \(b2.jpg\) does not decode"):
        load_rows(str(tmp_path / "hf"))  # checked before any model loads
    # met only while collating (e.g. the image changed after the check): still named by row
    rows, report, source = load_rows(str(tmp_path / "hf"), check_images=False)
    assert report.ok and [r.images for r in rows] == [["hf:0:0", "hf:0:1"], ["hf:1:0", "hf:1:1"]]
    processor = AutoProcessor.from_pretrained(tiny_dir)
    collator = StageCollator(processor, training_chat_template(processor, "mllama"), 64, 507, source=source)
    batch = collator([{"messages": rows[0].messages, "images": rows[0].images}])
    assert batch["pixel_values"].shape[1] == 2  # both images of the good row decoded
    with pytest.raises(ValueError, match=r"image hf:1:1 \(row 1, image 1\) \(b2.jpg\) cannot be read"):
        collator([{"messages": r.messages, "images": r.images} for r in rows])


def test_overwrite_output_dir_keeps_the_old_run_when_the_new_one_fails_early(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("previous run")
    with pytest.raises(FileNotFoundError):
        build_trainer(_cfg(tiny_dir, tmp_path / "no-such-data", out, "--overwrite_output_dir", "true"))
    assert (out / "adapter_model.safetensors").read_text() == "previous run"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        build_trainer(_cfg(tiny_dir, tmp_path / "no-such-data", tmp_path / "afile"))


def test_overwrite_waits_for_the_trainer_and_never_deletes_the_runs_own_input(tiny_dir, scenes, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_text("previous run")
    with pytest.raises(ValueError, match="nomatch"):  # PEFT refuses the targets while the trainer is built
        build_trainer(_cfg(tiny_dir, scenes, out, "--overwrite_output_dir", "true", "--peft", "lora",
                           "--lora_target_modules", "nomatch"))
    assert (out / "model.safetensors").read_text() == "previous run"
    import shutil

    shutil.copytree(scenes, out / "data")
    with pytest.raises(FileExistsError, match=r"holds this run's input \(--dataset "):
        build_trainer(_cfg(tiny_dir, out / "data", out, "--overwrite_output_dir", "true"))
    assert (out / "data" / "data.jsonl").is_file() and (out / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="holds no complete checkpoint"):  # nothing to resume from
        build_trainer(_cfg(tiny_dir, scenes, out, "--resume_from_checkpoint", "auto"))
    assert (out / "model.safetensors").is_file()
    # a valid run with --overwrite_output_dir: the old contents are set aside once its trainer is built (a hidden
    # folder beside it), and removed once its first step has trained
    setup = build_trainer(_cfg(tiny_dir, scenes, out, "--overwrite_output_dir", "true", "--max_steps", "1"))
    assert not (out / "model.safetensors").exists() and not (out / "data").exists()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".run.previous-")]
    assert (aside / "model.safetensors").read_text() == "previous run" and (aside / "data" / "data.jsonl").is_file()
    setup.trainer.train()
    assert (out / "checkpoint-1").is_dir() and not aside.exists()


def test_overwrite_puts_the_old_run_back_when_the_first_step_fails(tiny_dir, scenes, tmp_path, monkeypatch):
    from stagereason.train.trainer import StageSFTTrainer

    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("previous run")

    def out_of_memory(self, *args, **kwargs):  # what a first step too big for the GPU raises
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(StageSFTTrainer, "training_step", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_train(_cfg(tiny_dir, scenes, out, "--overwrite_output_dir", "true", "--max_steps", "1"))
    assert [p.name for p in out.iterdir()] == ["adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_text() == "previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing left aside


def test_the_previous_run_of_a_linked_output_dir_is_set_aside_and_put_back_where_the_link_points(tmp_path, caplog):
    from stagereason.fsio import inputs_inside
    from stagereason.train.rundir import PreviousRun, _prepare_output_dir

    real, link = tmp_path / "scratch" / "run1", tmp_path / "runs" / "run1"
    real.mkdir(parents=True)
    link.parent.mkdir()
    link.symlink_to(real)
    (real / "adapter_model.safetensors").write_text("previous run")
    previous = PreviousRun(link)
    previous.set_aside()
    assert link.is_symlink() and link.resolve() == real and list(real.iterdir()) == []  # a link stays a link
    (aside,) = [p for p in (tmp_path / "scratch").iterdir() if p.name.startswith(".run1.previous-")]
    (link / "checkpoint-1").mkdir()  # what the new run wrote before it failed
    assert previous.restore("failed") and [p.name for p in real.iterdir()] == ["adapter_model.safetensors"]
    assert not aside.exists() and link.is_symlink()
    # set aside and never put back (the run was killed): the next run in that output dir names the folder
    previous = PreviousRun(link)
    previous.set_aside()
    (cfg,) = parse_config((TrainConfig,), ["--output_dir", str(link), "--overwrite_output_dir", "true"])
    with caplog.at_level("WARNING", logger="stagereason.train.rundir"):
        _prepare_output_dir(cfg)
    assert f"{previous.aside} holds what an earlier --overwrite_output_dir run of {link} set aside" in caplog.text
    # an input reached through a link inside the output dir is inside it, as written
    (real / "imgs").symlink_to(tmp_path / "runs")
    assert inputs_inside(link, [("row a: image", str(link / "imgs" / "run1"))]) == [
        f"row a: image {link / 'imgs' / 'run1'}"]


def test_overwrite_never_deletes_the_rows_images(tiny_dir, scenes, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(scenes, out / "data")  # a dataset elsewhere whose image paths point into the output dir
    rows = [json.loads(x) for x in (scenes / "data.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = str(out / "data" / r["image"])
    data = tmp_path / "abs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FileExistsError, match=rf"holds {len(rows)} image\(s\) of this run's rows \(row {rows[0]['id']}"):
        build_trainer(_cfg(tiny_dir, data, out, "--overwrite_output_dir", "true"))
    assert len(list((out / "data" / "images").iterdir())) == len(rows)


def test_rows_the_chat_template_refuses_are_named_or_dropped(tiny_dir, scenes, tmp_path, capsys):
    rows = [json.loads(x) for x in (scenes / "data.jsonl").read_text().splitlines()]
    rows[1]["conversations"].insert(0, {"from": "system", "value": "Answer in stages."})  # with an image: refused
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "images").symlink_to(scenes / "images")
    args = ["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(data), "--dry_run",
            "--eval_split", "none", "--json"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"row {rows[1]['id']}: chat template: Prompting with images is incompatible with system messages" in err
    assert main(args + ["--skip_invalid"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["invalid_dropped"] == 1 and summary["train_rows"] == len(rows) - 1


def test_dry_run_estimates_the_steps_the_trainer_takes(tiny_dir, scenes, tmp_path, capsys, monkeypatch):
    import yaml

    from stagereason.train import runner

    def no_model(*args, **kwargs):
        raise AssertionError("a dry run loaded the model")

    monkeypatch.setattr(runner, "_load", no_model)
    # 20 training rows, batch 3: 7 batches; accumulation 2: 4 updates an epoch; 1.1 epochs: 5 updates
    args = ["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(scenes), "--dry_run", "--json",
            "--eval_split", "4", "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2",
            "--num_train_epochs", "1.1", "--max_steps", "-1", "--output_dir", str(tmp_path / "run")]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["estimated_steps"] == 5
    assert printed["config"]["per_device_train_batch_size"] == 3 and printed["config"]["eval_split"] == "4"
    assert main([a for a in args if a != "--json"]) == 0  # as a person reads it: the config as YAML, then the table
    text = capsys.readouterr().out
    config, table = text.split("# resolved config\n", 1)[1].split("dataset (dry run: nothing trained)", 1)
    assert yaml.safe_load(config)["gradient_accumulation_steps"] == 2
    assert "estimated_steps" in table and "5" in table.split("estimated_steps", 1)[1].splitlines()[0]
    assert not (tmp_path / "run").exists()  # nothing written
    for flags, said in ((["--eval_split", "1.5"], "--eval_split 1.5"),
                        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
                        (["--num_train_epochs", "-1"], "nothing to train"),
                        (["--gradient_checkpointing_kwargs", "notjson"], "--gradient_checkpointing_kwargs")):
        assert main(args + flags) == 2  # a bad option: exits as argparse does
        assert said in capsys.readouterr().err


def test_a_corrupt_image_met_while_training_names_its_file(tmp_path):
    from stagereason.train.data import open_image

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png cannot be read"):
        open_image(str(bad), 560)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        open_image(str(tmp_path / "gone.png"), 560)


def test_the_text_only_guess_is_the_commonest_answer_to_the_same_question_else_of_the_family():
    def row(q, a, fam):
        return Row(id=q + a, messages=[], images=[], answer=a, question=q, family=fam)

    train = [row("How many red?", "2", "count"), row("how many  RED?", "2", "count"),
             row("How many red?", "3", "count"), row("How many blue?", "4", "count"),
             row("How many blue?", "4", "count"), row("How many cats?", "4", "count"),
             row("Is it left?", "yes", "spatial")]
    guess = text_only_guesser(train)
    assert guess(row("HOW MANY RED?", "?", "count")) == "2"  # same question, case and spacing aside
    assert guess(row("How many green?", "?", "count")) == "4"  # unseen: the family's commonest
    assert guess(row("Is it right?", "?", "spatial")) == "yes"
    assert guess(row("What is it?", "?", None)) == "4"  # nothing to go on: the commonest overall
    assert text_only_guesser([])(row("Q?", "a", None)) == ""


def test_the_loss_plot_of_a_run_shorter_than_logging_steps_shows_its_mean_loss(tmp_path, monkeypatch, recwarn):
    import matplotlib.pyplot as plt

    from stagereason.train.rundir import _plot_loss

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    _plot_loss([{"step": 3, "train_loss": 2.5, "train_runtime": 1.0}], tmp_path / "loss.png")
    ((line,),) = [fig.axes[0].get_lines() for fig in figures]
    assert list(line.get_xdata()) == [3] and list(line.get_ydata()) == [2.5]
    assert "mean train loss" in line.get_label() and (tmp_path / "loss.png").stat().st_size > 0
    _plot_loss([], tmp_path / "empty.png")  # nothing logged at all: an empty plot, no legend warning
    assert not [w for w in recwarn if "No artists" in str(w.message)]


@pytest.mark.parametrize("sig,times", [(signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_a_signal_mid_training_saves_a_checkpoint_that_the_run_resumes_from(tiny_dir, scenes, tmp_path, sig, times):
    # sent to the process group, as a scheduler or a terminal does: the dataloader workers get it too; a
    # scheduler's SIGTERM may come twice (once from a launcher that forwards it), which is still one request
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "stagereason.cli", "train", "--model_name_or_path", str(tiny_dir),
           "--dataset", str(scenes), "--output_dir", str(out), "--peft", "lora", "--max_steps", "400",
           "--per_device_train_batch_size", "2", "--save_steps", "1000", "--gradient_checkpointing", "false",
           "--eval_split", "none", "--logging_steps", "1", "--dataloader_num_workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines, started, reader = watch_stderr(proc, 400)
    try:
        assert started.wait(240), "".join(lines)[-3000:]
        for _ in range(times):  # a repeat comes at once (a launcher forwards the signal as it gets it)
            os.killpg(proc.pid, sig)
            time.sleep(0.01)
        assert proc.wait(120) == 128 + sig, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(30)
    assert not any("DataLoader worker" in line for line in lines), "".join(lines)[-3000:]
    said = next(line for line in lines if "stopped by" in line)
    step = int(said.split(" at step ")[1].split()[0])
    assert f"stopped by {signal.Signals(sig).name} at step {step} of 400" in said and "--resume_from_checkpoint auto" in said
    assert 1 <= step < 400 and (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (out / "train_summary.json").exists()  # the run is not done
    # the same command resumes from there (a little further, to keep the test short)
    limit = ["--max_steps", str(step + 2)]
    res = subprocess.run([*cmd[:cmd.index("--max_steps")], *limit, *cmd[cmd.index("--max_steps") + 2:],
                          "--resume_from_checkpoint", "auto"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == step + 2 and summary["resumed_from_step"] == step
