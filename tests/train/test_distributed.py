"""train under a launcher: several processes (torchrun or accelerate launch; CPU processes talking over gloo).

GPUs are not needed to check what goes wrong between processes: which one writes the run dir, that the
stage-evaluation generations, split over the processes, still run when the weights are sharded (FSDP2, ZeRO-3),
and that FSDP and ZeRO-3 runs save their weights whole and resume from their sharded checkpoints.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stagereason.cli import main

from .watch import watch_stderr

WORKER = Path(__file__).with_name("shard_worker.py")
ACCELERATE_CPU = Path(__file__).with_name("accelerate_cpu.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list, timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher; on timeout (a hang) kill it with all its workers, not the launcher alone."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    return _run(cmd, timeout)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes") / "data"
    assert main(["gen", "--out", str(out), "--n", "24", "--no_progress"]) == 0
    return out


def test_generation_on_fsdp_sharded_weights_equals_the_unsharded_models(tiny_dir, tmp_path):
    # 5 items over 2 processes: shares of 3 and 2 (padded to 3), answers of different lengths; every forward
    # gathers the shards from both processes, so both must step together to the end
    out = tmp_path / "shared.json"
    res = _torchrun(WORKER, tiny_dir, out, 5, 1)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["sharded_class"].startswith("FSDP")
    assert len(set(got["lengths"])) > 1  # the processes do finish at different steps
    assert got["shared"] == got["reference"]


def test_two_processes_train_and_one_writes_the_run_dir(tiny_dir, scenes, tmp_path):
    out = tmp_path / "run"
    res = _torchrun("-m", "stagereason.cli", "train", "--model_name_or_path", tiny_dir, "--dataset", scenes,
                    "--output_dir", out, "--peft", "lora", "--use_cpu", "true", "--max_steps", "2",
                    "--per_device_train_batch_size", "2", "--eval_split", "5", "--stage_eval_samples", "5",
                    "--stage_eval_max_new_tokens", "8", "--dataloader_num_workers", "0", "--logging_steps", "1",
                    "--save_steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("trained: ") == 1 and res.stdout.count("held-out example") == 1
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["dataset"]["estimated_steps"] == 2
    assert summary["train_samples"] == 2 * 2 * 2 and summary["processes"] == 2
    assert summary["samples_per_s"] == pytest.approx(2 * 2 * 2 / summary["train_runtime_s"], rel=0.02)
    assert summary["peak_memory_kind"].endswith("the largest of the 2 processes'")
    assert json.loads((out / "run_info.json").read_text())["processes"] == 2
    # the 5 held-out rows were split 3 + 2 over the processes and gathered back, in order, once
    assert summary["eval"]["samples"] == 5
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and len({s["id"] for s in samples}) == 5
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    assert not list(out.glob("*.tmp*"))


def test_each_process_decodes_a_share_of_the_images_and_all_hear_of_a_bad_one(scenes, tiny_dir, tmp_path):
    images = sorted(str(p) for p in (scenes / "images").iterdir())[:7]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    images[1] = str(broken)
    res = _torchrun(WORKER, "images", tmp_path / "seen", *images)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(seen[0]["decoded"] + seen[1]["decoded"]) == sorted(images)  # each image once, by one process
    assert str(broken) in seen[1]["decoded"] and seen[0]["problems"] == seen[1]["problems"] == ["row1"]
    # through the train verb: both processes stop before any model loads, naming the row
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (scenes / "data.jsonl").read_text().splitlines()]
    (data / "images").mkdir()
    for r in rows:
        (data / r["image"]).write_bytes((scenes / r["image"]).read_bytes())
    (data / rows[1]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # the second process's share
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["-m", "stagereason.cli", "train", "--dataset", data, "--use_cpu", "true", "--output_dir", tmp_path / "run",
            "--eval_split", "4"]
    weightless = tmp_path / "weightless"  # its config and processor read, but no weights to load
    shutil.copytree(tiny_dir, weightless)
    (weightless / "model.safetensors").unlink()
    res = _torchrun(*args, "--model_name_or_path", weightless)
    assert res.returncode != 0
    # both processes stop, naming the row (rank 0 never decoded that image itself), before the model loads: the
    # missing weights are never reached, and nothing is written
    assert res.stderr.count(f"{rows[1]['id']}: image: image ") == 2 and "model.safetensors" not in res.stderr
    assert not (tmp_path / "run").exists()
    res = _torchrun(*args, "--model_name_or_path", tiny_dir, "--dry_run", "--skip_invalid", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    (printed,) = [line for line in res.stdout.splitlines() if line.startswith("{")]  # one process prints
    assert json.loads(printed)["invalid_dropped"] == 1 and json.loads(printed)["train_rows"] == 19


def _launch(config, *args, timeout=400):
    """``train`` under accelerate launch with ``config``; a DeepSpeed JSON goes to the Trainer (``--deepspeed``)
    under torchrun instead."""
    if str(config).endswith(".json"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ACCELERATE_CPU), "train", *map(str, args), "--deepspeed", str(config)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               "2", "--mixed_precision", "no", "--main_process_port", "0", str(ACCELERATE_CPU), "train",
               *map(str, args)]
    return _run(cmd, timeout)


def _losses(run):
    history = json.loads((run / "checkpoint-4/trainer_state.json").read_text())["log_history"]
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def _launch_config(name: str, tmp_path: Path) -> Path:
    """The project's own accelerate config; ``zero3-nosave``: ZeRO-3 told not to gather the weights at a save;
    ``zero3-json``: the same as a DeepSpeed config file given to the Trainer."""
    if name == "fsdp":
        return ROOT / "train/accelerate/fsdp.yaml"
    pytest.importorskip("deepspeed")
    if name == "zero3-json":
        config = tmp_path / "ds_zero3.json"
        config.write_text(json.dumps({
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}))
        return config
    config = ROOT / "train/accelerate/deepspeed_zero3.yaml"
    if name == "zero3-nosave":
        text = config.read_text()
        assert "zero3_save_16bit_model: true" in text
        config = tmp_path / "nosave.yaml"
        config.write_text(text.replace("zero3_save_16bit_model: true", "zero3_save_16bit_model: false"))
    return config


@pytest.mark.parametrize("launcher,peft", [("fsdp", "lora"), ("fsdp", "qlora"), ("fsdp", "none"), ("zero3", "qlora"),
                                           ("zero3-nosave", "none"), ("zero3-json", "qlora")])
def test_sharded_runs_save_whole_weights_and_resume_from_their_sharded_checkpoints(tiny_dir, scenes, tmp_path,
                                                                                   launcher, peft):
    # FSDP2 and DeepSpeed ZeRO-3 over two CPU processes, from the project's own accelerate configs. ZeRO-3 without
    # weight gathering at saves used to leave no loadable weights in the run dir; QLoRA under ZeRO-3 failed to load.
    from safetensors.torch import load_file

    config = _launch_config(launcher, tmp_path)
    weights = "model.safetensors" if peft == "none" else "adapter_model.safetensors"
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    args = ["--model_name_or_path", tiny_dir, "--dataset", scenes, "--peft", peft, "--max_steps", "4",
            "--per_device_train_batch_size", "2", "--eval_split", "4", "--stage_eval_samples", "3",
            "--stage_eval_max_new_tokens", "8", "--logging_steps", "1", "--save_steps", "2",
            "--gradient_checkpointing", "true", "--learning_rate", "1e-2", "--dataloader_num_workers", "0"]
    res = _launch(config, *args, "--output_dir", first)
    assert res.returncode == 0, res.stderr[-3000:]
    # sharded checkpoints: it did run sharded
    sharded = "pytorch_model_fsdp_0" if launcher == "fsdp" else "global_step2"
    assert (first / "checkpoint-2" / sharded).is_dir()
    assert not (first / "global_step4").exists()  # the run dir holds the whole weights, not DeepSpeed's partitions
    saved = load_file(first / weights)
    if peft != "none":  # every adapted projection's A and B, trained
        assert len(saved) > 0 and all(".lora_A." in k or ".lora_B." in k for k in saved)
        assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)
        assert json.loads((first / "run_info.json").read_text())["quantization"] == \
            ("4bit-nf4" if peft == "qlora" else None)
    else:  # the whole model, under the names from_pretrained loads, trained
        from transformers import AutoModelForImageTextToText

        model, info = AutoModelForImageTextToText.from_pretrained(first, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        base = AutoModelForImageTextToText.from_pretrained(tiny_dir).state_dict()
        assert any(not torch.equal(v, base[k]) for k, v in model.state_dict().items())
    # a sharded checkpoint of the other kind is named before anything loads
    from stagereason.train.rundir import _check_checkpoint_kind

    other = "none" if peft != "none" else "lora"
    with pytest.raises(ValueError, match=f"and this run is --peft {other}"):
        _check_checkpoint_kind(first / "checkpoint-2", other)
    # killed after checkpoint-2: the resumed run takes the same steps 3 and 4 and ends with the same weights
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    res = _launch(config, *args, "--output_dir", resumed, "--resume_from_checkpoint", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((resumed / "train_summary.json").read_text())["resumed_from_step"] == 2
    assert _losses(resumed) == _losses(first)
    again = load_file(resumed / weights)
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


def test_lora_under_fsdps_own_activation_checkpointing_is_refused(tiny_dir, scenes, tmp_path, monkeypatch, capsys):
    # FSDP's checkpoint wrappers hide the adapter from PEFT: every checkpoint and the final adapter came out empty
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    args = ["train", "--model_name_or_path", str(tiny_dir), "--dataset", str(scenes), "--output_dir",
            str(tmp_path / "run"), "--dry_run"]
    assert main(args + ["--peft", "lora"]) == 2
    assert "fsdp_activation_checkpointing: false" in capsys.readouterr().err


def _with_text_only_rows(scenes: Path, out: Path) -> tuple[Path, Path]:
    """Training rows alternating with and without an image, and an eval file whose first half has images and
    second half none (so one process's share of the held-out generations has images, the other's none)."""
    rows = [json.loads(line) for line in (scenes / "data.jsonl").read_text().splitlines()]
    out.mkdir()
    shutil.copytree(scenes / "images", out / "images")

    def text_only(r):
        turns = [dict(t, value=t["value"].replace("<image>", "").strip()) for t in r["conversations"]]
        return {**{k: v for k, v in r.items() if k != "image"}, "id": r["id"] + "-text", "conversations": turns}

    train = [x for r in rows[:16] for x in (r, text_only(r))]
    (out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    held = rows[16:18] + [text_only(r) for r in rows[18:20]]
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    return out / "data.jsonl", out / "eval.jsonl"


@pytest.mark.parametrize("launcher", ["fsdp", "zero3", "ddp-strict"])
def test_a_process_whose_batch_has_no_image_steps_with_the_others(tiny_dir, scenes, tmp_path, launcher):
    # a batch without an image skipped the vision tower and Mllama's cross-attention layers on its process only:
    # FSDP and ZeRO-3 crashed on mismatched collectives, DDP without find_unused_parameters hung; the held-out
    # generations crashed the same way under FSDP and ZeRO-3 (their first half has images, their second none)
    data, held = _with_text_only_rows(scenes, tmp_path / "data")
    out = tmp_path / "run"
    args = ["--model_name_or_path", tiny_dir, "--dataset", data, "--eval_split", held, "--output_dir", out,
            "--max_steps", "6", "--per_device_train_batch_size", "1", "--stage_eval_samples", "4",
            "--stage_eval_max_new_tokens", "4", "--logging_steps", "1", "--gradient_checkpointing", "true",
            "--dataloader_num_workers", "0", "--save_strategy", "no"]
    if launcher == "ddp-strict":
        res = _torchrun("-m", "stagereason.cli", "train", *args, "--peft", "none", "--use_cpu", "true",
                        "--ddp_find_unused_parameters", "false", timeout=240)
    else:
        res = _launch(_launch_config(launcher, tmp_path), *args, "--peft", "lora", timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval"]["samples"] == 4
    # the filler rows given to batches without an image are not counted as trained rows (or their tokens)
    assert summary["train_samples"] == 6 * 2
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["id"].endswith("-text") for s in samples] == [False, False, True, True]


def test_a_signal_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tiny_dir, scenes, tmp_path):
    # a scheduler may signal the processes at different moments, or only one: they agree on the step to stop
    # at (a deadlock otherwise: one waiting in the next step's collectives, the other in the checkpoint's)

    import psutil

    out = tmp_path / "run"
    args = ["-m", "stagereason.cli", "train", "--model_name_or_path", tiny_dir, "--dataset", scenes,
            "--output_dir", out, "--peft", "lora", "--use_cpu", "true", "--per_device_train_batch_size", "2",
            "--eval_split", "none", "--dataloader_num_workers", "0", "--logging_steps", "1", "--save_steps", "1000"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *map(str, args), "--max_steps", "300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines, started, reader = watch_stderr(proc, 300)
    try:
        assert started.wait(240), "".join(lines)[-3000:]
        rank1 = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                     if p.environ().get("RANK") == "1" and p.environ().get("LOCAL_RANK") == "1"
                     and "stagereason.cli" in " ".join(p.cmdline()))
        rank1.send_signal(signal.SIGTERM)
        proc.wait(180)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    reader.join(30)
    said = next((line for line in lines if "stopped by" in line), None)
    assert said is not None, "".join(lines)[-3000:]
    step = int(said.split(" at step ")[1].split()[0])
    assert "stopped by a signal to another process" in said  # rank 0 prints; rank 1 got the signal
    ckpt = out / f"checkpoint-{step}"
    assert {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    assert [p.name for p in out.glob("checkpoint-*")] == [ckpt.name] and not (out / "train_summary.json").exists()
    res = _torchrun(*args, "--max_steps", step + 2, "--resume_from_checkpoint", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == step + 2 and summary["resumed_from_step"] == step
