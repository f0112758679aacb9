"""Throughput of `stagereason gen` against a loopback teacher, measured side by side in one run.

Two runs over the same LLaVA-style dataset (small PNG images written here):

* a teacher that answers at once: records/s is our own overhead per record
  (client, verification, image handling, writing), the teacher being a
  Python HTTP server in another process on the same machine;
* a teacher that answers in 200 ms, at concurrency 64: the ideal is
  64 / 0.2 s = 320 records/s; the ratio to it says how much we lose.

    python bench/datagen.py            # a table
    python bench/datagen.py --json     # one JSON line
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from stagereason.console import report
from stagereason.data_gen.runner import GenConfig, run_gen


def _dataset(root: Path, n: int) -> Path:
    (root / "imgs").mkdir(parents=True)
    for i in range(16):
        Image.new("RGB", (64, 64), (i * 15, 80, 160)).save(root / "imgs" / f"{i}.png")
    path = root / "data.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "image": f"imgs/{i % 16}.png", "conversations": [
                {"from": "human", "value": f"<image>\nHow many objects are in picture {i}?"},
                {"from": "gpt", "value": str(i % 7)}]}) + "\n")
    return path


def _teacher(latency: float):
    proc = subprocess.Popen([sys.executable, "-m", "stagereason.data_gen.loopback", "--port", "0",
                             "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    return proc, url


def _run(data: Path, out: Path, latency: float, concurrency: int) -> dict:
    proc, url = _teacher(latency)
    try:
        cfg = GenConfig(out=str(out), source="llava", data=str(data), teacher_base_url=[url],
                        teacher_model="loopback", concurrency=concurrency, progress=False, json=True)
        t0 = time.perf_counter()
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            summary = run_gen(cfg)
        elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait()
    assert summary["accepted"] == summary["this_run_processed"], summary
    return {"records": summary["this_run_processed"], "elapsed_s": round(elapsed, 3),
            "records_per_s": round(summary["this_run_processed"] / elapsed, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--n_fast", type=int, default=3000, help="records for the zero-latency run")
    p.add_argument("--n_slow", type=int, default=1920, help="records for the 200 ms run (6 s at the ideal rate)")
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fast = _run(_dataset(tmp / "fast", args.n_fast), tmp / "out_fast", 0.0, args.concurrency)
        slow = _run(_dataset(tmp / "slow", args.n_slow), tmp / "out_slow", 0.2, args.concurrency)
    ideal = args.concurrency / 0.2
    result = {
        "zero_latency_records_per_s": fast["records_per_s"],
        "overhead_ms_per_record": round(1000 / fast["records_per_s"], 3),
        "latency_200ms_records_per_s": slow["records_per_s"],
        "ideal_records_per_s": ideal,
        "ratio_to_ideal": round(slow["records_per_s"] / ideal, 3),
        "concurrency": args.concurrency,
    }
    report("bench/datagen.py: gen throughput", result, args.json)


if __name__ == "__main__":
    main()
