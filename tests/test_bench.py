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


def test_gpu_11b_build_infer_and_train_run_on_the_test_architecture(tmp_path):
    model = tmp_path / "m"
    assert _bench(str(ROOT / "bench/gpu_11b.py"), "build", str(model), "--arch", "test", cwd=tmp_path)["arch"] == "test"
    out = _bench(str(ROOT / "bench/gpu_11b.py"), "infer", str(model), "--max_stage_tokens", "4", "--repeats", "1",
                 cwd=tmp_path)
    assert {"greedy_s", "stage_n2_s", "stage_n4_s", "overhead_vs_greedy_n4"} <= set(out)
    out = _bench(str(ROOT / "bench/gpu_11b.py"), "train", str(model), "--seq", "256", "--steps", "2",
                 "--max_image_tiles", "2", cwd=ROOT)
    assert out["measured_steps"] == 2 and out["last_loss"] is not None


def test_gpu_11b_train_splits_the_peak_by_phase(tmp_path, monkeypatch):
    # the GPU memory readings, faked on the CPU: each reading is a new high, so every phase of every measured step
    # must be read, in order (forward, backward, optimizer), and the run's own peak kept across the phase resets
    import importlib.util
    import types

    import torch

    spec = importlib.util.spec_from_file_location("gpu_11b", ROOT / "bench/gpu_11b.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tmp_path / "m"
    bench.build(model, "test")
    marks, level = [], [0.0]

    def reading():
        level[0] += 2**30
        return level[0]

    def reset():
        marks.append(level[0])

    fake = types.SimpleNamespace(is_available=lambda: True, synchronize=lambda: None, memory_allocated=reading,
                                 max_memory_allocated=reading, max_memory_reserved=reading,
                                 reset_peak_memory_stats=reset)

    class TorchWithFakeCuda(types.ModuleType):  # the bench's own `torch`; everything but `cuda` is the real one
        cuda = fake

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(bench, "torch", TorchWithFakeCuda("torch"))
    monkeypatch.chdir(ROOT)
    out = bench.train(model, 256, 2, steps=2, warmup=1, lora_r=4, recipe="train/llama32v-11b-qlora.yaml",
                      overrides=["--max_image_tiles", "2"])
    phases = out["phase_peak_allocated_gb"]
    assert list(phases) == ["between_steps", "forward", "backward", "optimizer"]
    assert 0 < phases["between_steps"] < phases["forward"] < phases["backward"] < phases["optimizer"]
    assert len(marks) == 1 + 3 * 4  # before training, then 4 per step: its start and each phase's end
    assert out["peak_allocated_gb"] >= phases["optimizer"] and out["peak_reserved_gb"] > 0


def test_infer_bench_runs(tmp_path):
    out = _bench(str(ROOT / "bench/infer.py"), "--max_stage_tokens", "4", "--repeats", "1", cwd=tmp_path)
    assert out["speedup_vs_naive_n4"] > 0 and out["max_stage_tokens"] == 4
