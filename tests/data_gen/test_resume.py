"""Crash safety: SIGKILL gen subprocesses at random moments, resume, compare with an uninterrupted run.

Assets: LLaVA rows and images from assets.py; procedural scenes; the loopback teacher
(stagereason.data_gen.loopback) runs in this process, the killed gen runs in real subprocesses.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

from stagereason.data_gen.loopback import LoopbackTeacher

from .assets import row, write_llava

GEN = [sys.executable, "-m", "stagereason.cli", "gen", "--no_progress"]


def _records(out):
    lines = (out / "data.jsonl").read_text().splitlines() if (out / "data.jsonl").exists() else []
    recs = [json.loads(x) for x in lines]  # every line is whole JSON
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "duplicate accepted record"
    return {r["id"]: r for r in recs}


def _rejects(out):
    lines = (out / "rejects.jsonl").read_text().splitlines() if (out / "rejects.jsonl").exists() else []
    recs = [json.loads(x) for x in lines]
    assert len(recs) == len({r["id"] for r in recs}), "duplicate reject"
    return {r["id"]: r["reason"] for r in recs}


def _written(out) -> int:
    return sum((out / name).read_bytes().count(b"\n") for name in ("data.jsonl", "rejects.jsonl")
               if (out / name).exists())


def _kill_at_random_moments(cmd, out, rng, kills, lo, hi):
    """SIGKILL ``kills`` runs, each once it has written between ``lo`` and ``hi`` more lines (a random number).

    Kills follow progress, not the clock, so they land mid-run on a fast machine and a slow one alike;
    polling every few milliseconds, a kill still falls anywhere in a write.
    """
    for _ in range(kills):
        target = _written(out) + rng.randint(lo, hi)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while proc.poll() is None and _written(out) < target:
            time.sleep(0.003)
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sigkill_then_resume_equals_uninterrupted_run_with_a_teacher(tmp_path):
    rng = random.Random(1234)
    kinds = ["", "", "", " #fault=wrong_answer", " #fault=refusal", " #fault=broken_tags", " #fault=500*1"]
    rows = [row(f"r{i:03d}", f"Question {i}?{rng.choice(kinds)}", f"{i}", image=f"imgs/{i % 8}.jpg")
            for i in range(200)]
    data = write_llava(tmp_path, rows)
    with LoopbackTeacher(latency=0.05) as teacher:  # about 5 s of work at concurrency 2
        def cmd(out):
            return GEN + ["--source", "llava", "--data", str(data), "--out", str(out), "--teacher_base_url",
                          teacher.url, "--teacher_model", "m", "--concurrency", "2", "--backoff", "0.01"]

        subprocess.run(cmd(tmp_path / "ref"), check=True, capture_output=True)
        _kill_at_random_moments(cmd(tmp_path / "killed"), tmp_path / "killed", rng, kills=4, lo=3, hi=30)
        partial = _records(tmp_path / "killed")
        assert 0 < len(partial) + len(_rejects(tmp_path / "killed")) < 200, "kills should land mid-run"
        requests_before = teacher.requests
        done_before = set(partial) | set(_rejects(tmp_path / "killed"))
        subprocess.run(cmd(tmp_path / "killed"), check=True, capture_output=True)
        resumed_requests = teacher.requests - requests_before
    ref, got = _records(tmp_path / "ref"), _records(tmp_path / "killed")
    assert got == ref
    assert _rejects(tmp_path / "killed") == _rejects(tmp_path / "ref")
    for rec in got.values():
        assert (tmp_path / "killed" / rec["image"]).is_file()
    # nothing already accepted or rejected was sent again: at most 3 attempts + 1 retry per remaining example
    assert resumed_requests <= 4 * (200 - len(done_before))


def test_sigkill_then_resume_equals_uninterrupted_run_synthetic(tmp_path):
    rng = random.Random(99)
    base = GEN + ["--n", "2500", "--seed", "3"]
    subprocess.run(base + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)
    _kill_at_random_moments(base + ["--out", str(tmp_path / "killed")], tmp_path / "killed", rng, kills=4,
                            lo=50, hi=400)
    assert 0 < len(_records(tmp_path / "killed")) < 2500
    subprocess.run(base + ["--out", str(tmp_path / "killed")], check=True, capture_output=True)
    assert _records(tmp_path / "killed") == _records(tmp_path / "ref")
    done = subprocess.run(base + ["--out", str(tmp_path / "killed")], capture_output=True, text=True)
    assert done.returncode == 0 and "nothing to do" in done.stderr


def test_partial_last_line_is_repaired_and_redone(tmp_path):
    base = GEN + ["--n", "20", "--out", str(tmp_path / "out")]
    subprocess.run(base, check=True, capture_output=True)
    data = tmp_path / "out" / "data.jsonl"
    full = data.read_text()
    lines = full.splitlines(keepends=True)
    data.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a write cut by a kill
    res = subprocess.run(base, capture_output=True, text=True)
    assert res.returncode == 0 and "repaired a partial last line" in res.stderr
    assert _records(tmp_path / "out") == {json.loads(x)["id"]: json.loads(x) for x in lines}


def test_a_corrupt_line_in_the_middle_is_never_dropped_silently(tmp_path):
    base = GEN + ["--n", "5", "--out", str(tmp_path / "out")]
    subprocess.run(base, check=True, capture_output=True)
    data = tmp_path / "out" / "data.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    data.write_text(lines[0] + "{garbage\n" + "".join(lines[1:]))
    res = subprocess.run(base + ["--n", "6"], capture_output=True, text=True)
    assert res.returncode == 1 and "data.jsonl line 2 is not a valid JSON object" in res.stderr
    assert data.read_text() == lines[0] + "{garbage\n" + "".join(lines[1:])  # untouched


def test_images_that_share_an_output_name_both_survive(tmp_path):
    """`../x/0.png` and `x/0.png` (or ids that sanitise alike) map to one name: neither may replace the other."""
    from PIL import Image

    from stagereason.data_gen.runner import _Writer
    from stagereason.data_gen.sources import Example, Turn

    (tmp_path / "src" / "x").mkdir(parents=True)
    red, blue = tmp_path / "src" / "0.png", tmp_path / "src" / "x" / "0.png"
    Image.new("RGB", (4, 4), "red").save(red)
    Image.new("RGB", (4, 4), "blue").save(blue)
    out = tmp_path / "out"
    out.mkdir()
    writer = _Writer(out, copy_images=True)
    paths = []
    for rid, src, name in (("a", red, "../x/0.png"), ("b", blue, "x/0.png"), ("c", red, "x/0.png")):
        ex = Example(id=rid, images=[src], turns=[Turn("Q", "A", "Q")], image_names=[name])
        paths.append(writer._put_image(ex, 0, src.read_bytes(), "PNG"))
    assert paths[0] == "images/x/0.png" and paths[1] != paths[0]
    assert Image.open(out / paths[0]).getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(out / paths[1]).getpixel((0, 0)) == (0, 0, 255)
    assert paths[2] == paths[0]  # the same image again reuses its file
    again = writer._put_image(Example(id="b", images=[blue], turns=[Turn("Q", "A", "Q")], image_names=["x/0.png"]), 0,
                              blue.read_bytes(), "PNG")
    assert again == paths[1]  # a rerun names it the same way


def test_a_resumed_synthetic_run_does_not_draw_finished_examples(tmp_path, monkeypatch):
    from stagereason.cli import main
    from stagereason.data_gen import scenes

    args = ["gen", "--out", str(tmp_path / "d"), "--n", "4", "--no_progress"]
    assert main([*args[:-1], "--limit", "3", "--no_progress"]) != 2
    drawn = []
    real = scenes.make_example
    monkeypatch.setattr(scenes, "make_example", lambda seed, i, **kw: drawn.append(i) or real(seed, i, **kw))
    assert main(args) == 0
    assert drawn == [3]  # only the one not yet done
    assert len((tmp_path / "d" / "data.jsonl").read_text().splitlines()) == 4
