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


def test_gpu_11b_build_and_infer_run_on_the_test_architecture(tmp_path):
    model = tmp_path / "m"
    assert _bench(str(ROOT / "bench/gpu_11b.py"), "build", str(model), "--arch", "test", cwd=tmp_path)["arch"] == "test"
    out = _bench(str(ROOT / "bench/gpu_11b.py"), "infer", str(model), "--max_stage_tokens", "4", "--repeats", "1",
                 cwd=tmp_path)
    assert {"greedy_s", "stage_n2_s", "stage_n4_s", "overhead_vs_greedy_n4"} <= set(out)


def test_infer_bench_runs(tmp_path):
    out = _bench(str(ROOT / "bench/infer.py"), "--max_stage_tokens", "4", "--repeats", "1", cwd=tmp_path)
    assert out["speedup_vs_naive_n4"] > 0 and out["max_stage_tokens"] == 4
