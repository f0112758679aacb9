"""The bench scripts run end to end on a tiny model (tiny settings): a bench that no longer starts is caught here,
not on the GPU machine. Their numbers are not checked; bench/RESULTS.md holds measured ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args, "--json"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_gpu_session_script_runs_every_gpu_11b_step_on_the_test_architecture(tmp_path):
    # bench/gpu_session.sh is what a GPU machine runs (build, train with its memory trace, train with PEFT's
    # dropout, infer, train with expandable segments); on the tiny `test` architecture every step runs on the CPU
    env = {**os.environ, "OUT": str(tmp_path / "out"), "ARCH": "test", "SEQ": "256", "MODEL": str(tmp_path / "m"),
           "TRAIN_FLAGS": "--max_image_tiles 2 --steps 2", "BUDGET_S": "100000",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_session.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = (tmp_path / "out/steps.txt").read_text().splitlines()
    names = ["build", "train_trace", "train_peft_dropout", "infer", "train_expandable"]
    assert [line.split(":")[0] for line in steps] == [f"# {n}" for n in names]
    assert all(": rc 0," in line for line in steps), steps
    result = {name: json.loads((tmp_path / f"out/{name}.json").read_text())
              for name in names}
    assert result["build"]["arch"] == "test"
    assert result["train_trace"]["measured_steps"] == 2 and result["train_trace"]["last_loss"] is not None
    assert result["train_trace"]["alloc_conf"] is None
    assert "--lean_lora_dropout false" in result["train_peft_dropout"]["overrides"]
    assert result["train_peft_dropout"]["lean_lora_dropout_layers"] == 0 < result["train_trace"]["lean_lora_dropout_layers"]
    assert result["train_expandable"]["alloc_conf"] == "expandable_segments:True"
    assert {"greedy_s", "stage_n2_s", "stage_n4_s", "overhead_vs_greedy_n4"} <= set(result["infer"])


def test_train_memory_measures_every_dropout_variant_on_the_test_model(tmp_path):
    out = _bench(str(ROOT / "bench/train_memory.py"), "--arch", "test", "--seq", "256", "--max_image_tiles", "2",
                 "--sites", "3", cwd=tmp_path)
    assert out["measured"] == "cpu storages allocated by operators" and out["row_tokens"] <= 256
    lean = {v: out[f"{v}_layers_with_lean_dropout"] for v in ("peft", "lean", "none")}
    assert lean["peft"] == lean["none"] == 0 < lean["lean"]
    for v in ("peft", "lean", "none"):
        assert out[f"{v}_step_peak_bytes"] > 0 and len(out[f"{v}_sites"]) == 3
    assert out["lean_step_peak_bytes"] <= out["peft_step_peak_bytes"] and "lean_over_peft" in out


def _load_gpu_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_11b", ROOT / "bench/gpu_11b.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_gpu_11b_train_splits_the_peak_by_phase_and_traces_one_more_step(tmp_path, monkeypatch):
    # the GPU memory readings, faked on the CPU: each reading is a new high, so every phase of every measured step
    # must be read, in order (vision tower, rest of the forward, backward, optimizer), and the run's own peak kept
    # across the phase resets; with --memory_trace one more step is recorded, from its start to its end
    import types

    import torch

    bench = _load_gpu_bench()
    model = tmp_path / "m"
    bench.build(model, "test")
    marks, level, recording, steps_seen = [], [0.0], [], []

    def reading():
        level[0] += 2**30
        return level[0]

    def reset():
        marks.append(level[0])

    def record(enabled="all", **kwargs):
        recording.append((enabled, len(steps_seen)))

    trace = [{"action": "alloc", "addr": 1, "size": 3 * 2**30, "frames": []}]
    memory = types.SimpleNamespace(_record_memory_history=record,
                                   _snapshot=lambda: {"device_traces": [trace], "segments": []})
    fake = types.SimpleNamespace(is_available=lambda: True, synchronize=lambda: steps_seen.append(1),
                                 memory_allocated=reading, max_memory_allocated=reading,
                                 max_memory_reserved=reading, reset_peak_memory_stats=reset, memory=memory,
                                 current_device=lambda: 0)

    class TorchWithFakeCuda(types.ModuleType):  # the bench's own `torch`; everything but `cuda` is the real one
        cuda = fake

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(bench, "torch", TorchWithFakeCuda("torch"))
    monkeypatch.chdir(ROOT)
    out = bench.train(model, 256, 2, steps=2, warmup=1, lora_r=4, recipe="train/llama32v-11b-qlora.yaml",
                      overrides=["--max_image_tiles", "2"], trace_top=5)
    phases = out["phase_peak_allocated_gb"]
    assert list(phases) == ["between_steps", "vision", "forward", "backward", "optimizer"]
    assert 0 < phases["between_steps"] < phases["vision"] < phases["forward"] < phases["backward"] \
        < phases["optimizer"]
    assert phases["vision"] < out["live_after_forward_gb"] < phases["backward"]
    assert len(marks) == 1 + 4 * 5  # before training, then 5 per step (its start, each phase's end), 1 traced step
    assert out["peak_allocated_gb"] >= phases["optimizer"] and out["peak_reserved_gb"] > 0
    # recording starts as the 4th step begins (3 step ends timed before it) and stops at its end; not timed
    assert recording == [("all", 3), (None, 4)] and out["measured_steps"] == 2
    traced = out["traced_step"]
    assert traced["allocated_in_step_live_at_peak_gb"] == 3.0
    assert traced["sites"] == [{"site": "(no Python frame: autograd's backward engine)", "gb": 3.0, "blocks": 1}]


def test_peak_sites_names_the_code_holding_memory_at_the_peak():
    import torch

    bench = _load_gpu_bench()
    gib = 2**30
    in_torch = {"filename": str(Path(torch.__file__).parent / "nn/modules/linear.py"), "line": 134, "name": "forward"}
    mllama = {"filename": "/venv/lib/python3.11/site-packages/transformers/models/mllama/modeling_mllama.py",
              "line": 100, "name": "forward"}
    dequant = {"filename": "/venv/lib/python3.11/site-packages/bitsandbytes/functional.py", "line": 50,
               "name": "dequantize_4bit"}
    trace = [
        {"action": "segment_alloc", "addr": 0, "size": 8 * gib},  # not an allocation: ignored
        {"action": "alloc", "addr": 1, "size": gib, "frames": [in_torch, mllama]},
        {"action": "alloc", "addr": 2, "size": 2 * gib, "frames": [dequant, mllama]},
        {"action": "free_requested", "addr": 2, "size": 2 * gib},  # only a request: still held
        {"action": "alloc", "addr": 4, "size": gib // 2, "frames": [in_torch, mllama]},  # the peak: 13.5 GiB
        {"action": "free_completed", "addr": 2, "size": 2 * gib},
        {"action": "alloc", "addr": 2, "size": gib // 4, "frames": []},  # the address reused
        {"action": "free_completed", "addr": 99, "size": gib},  # a block from before the step
        {"action": "alloc", "addr": 5, "size": 2 * gib, "frames": [in_torch]},  # 12.75: under the peak
    ]
    out = bench.peak_sites(trace, 10 * gib, top=1)
    assert out["peak_allocated_gb"] == 13.5 and out["allocated_at_step_start_gb"] == 10.0
    assert out["of_it_live_at_peak_gb"] == 10.0 and out["allocated_in_step_live_at_peak_gb"] == 3.5
    assert out["sites"] == [{"site": "bitsandbytes/functional.py:50 dequantize_4bit", "gb": 2.0, "blocks": 1}]
    assert out["other_sites_gb"] == 1.5 and out["events"] == 7
    out = bench.peak_sites(trace, 10 * gib, top=5)
    assert out["sites"][1] == {"site": "transformers/models/mllama/modeling_mllama.py:100 forward", "gb": 1.5,
                               "blocks": 2}
    # frames only inside torch: the innermost one names the site
    assert bench._site([in_torch]).endswith("nn/modules/linear.py:134 forward")


def test_infer_bench_runs(tmp_path):
    out = _bench(str(ROOT / "bench/infer.py"), "--max_stage_tokens", "4", "--repeats", "1", cwd=tmp_path)
    assert out["speedup_vs_naive_n4"] > 0 and out["max_stage_tokens"] == 4
