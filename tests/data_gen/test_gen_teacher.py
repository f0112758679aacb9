"""gen through a real HTTP teacher on 127.0.0.1 that injects faults.

Assets: LLaVA rows and images from conftest.py; the teacher is
stagereason.data_gen.loopback.LoopbackTeacher (a real chat-completions server).
"""

import asyncio
import json
import time

import pytest

from stagereason.cli import main
from stagereason.data_gen.loopback import LoopbackTeacher
from stagereason.data_gen.teacher import Teacher, TeacherConfigError

from .assets import EXPECTED, row, write_llava


def _gen(data, out, url, *more):
    return main(["gen", "--source", "llava", "--data", str(data), "--out", str(out), "--teacher_base_url", *url,
                 "--teacher_model", "loopback", "--timeout", "1", "--backoff", "0.02", "--no_progress", *more])


def _outcomes(out):
    got = {}
    for line in (out / "data.jsonl").read_text().splitlines():
        got[json.loads(line)["id"]] = "accepted"
    for line in (out / "rejects.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["id"] not in got, f"{rec['id']} both accepted and rejected"
        got[rec["id"]] = rec["reason"].split(":")[0]
    return got


def test_every_example_ends_accepted_or_rejected_for_the_right_reason(tmp_path, llava_rows):
    data = write_llava(tmp_path, llava_rows, extra_lines=["{not json"])
    with LoopbackTeacher(slow_seconds=2.5) as teacher:
        assert _gen(data, tmp_path / "out", [teacher.url], "--judge") == 0
    out = tmp_path / "out"
    assert _outcomes(out) == EXPECTED
    rejects = {json.loads(x)["id"]: json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()}
    assert "missing image" in rejects["missing_image"]["reason"] and "nope.jpg" in rejects["missing_image"]["reason"]
    assert "corrupt image imgs/corrupt.jpg" in rejects["corrupt_image"]["reason"]
    assert "wrong roles: turn 1 is 'gpt'" in rejects["bad_roles"]["reason"]
    assert "missing answer" in rejects["no_answer"]["reason"]
    assert "line 18" in rejects["line-18"]["reason"] and "bad JSON" in rejects["line-18"]["reason"]
    assert rejects["wrong"]["attempts"] == 3 and "definitely not B" in rejects["wrong"]["raw"]
    assert rejects["broken"]["reason"].startswith("format: unclosed <CAPTION>")
    stats = json.loads((out / "stats.json").read_text())
    run = stats["runs"][-1]
    assert stats["accepted"] == 10 and stats["rejected"] == 8
    assert run["transport_faults"] == {"http_500": 2, "http_429": 2, "timeout": 1, "malformed_response": 1,
                                       "connection": 1}
    assert run["retries"] == 7 and run["judge_accepted"] == 1
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0


def test_accepted_records_keep_the_llava_cot_layout(tmp_path, llava_rows):
    data = write_llava(tmp_path, llava_rows[:2] + [llava_rows[-1]])
    with LoopbackTeacher() as teacher:
        assert _gen(data, tmp_path / "out", [teacher.url]) == 0
    recs = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "data.jsonl").read_text().splitlines())}
    ok = recs["ok"]
    assert ok["image"] == "images/imgs/0.jpg" and (tmp_path / "out" / ok["image"]).is_file()
    assert (tmp_path / "out" / ok["image"]).stat().st_ino == (tmp_path / "imgs" / "0.jpg").stat().st_ino  # linked
    assert ok["conversations"][0] == {"from": "human", "value": "<image>\nWhat color is it?"}
    assert ok["conversations"][1]["value"].startswith("<SUMMARY>") and ok["answer"] == "red"
    assert ok["hints"] == ["The object is red."]
    assert [t["from"] for t in recs["multi"]["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert recs["multi"]["answers"] == ["3", "4"]


def test_prompt_carries_hints_choices_and_language(tmp_path):
    seen = []

    class Recording(LoopbackTeacher):
        async def _handle(self, req, body):
            seen.append(body)
            return await super()._handle(req, body)

    data = write_llava(tmp_path, [row("q", "Which? <image>", "B", hints=["Hint one: F = ma.", "Hint two."],
                                      choices={"A": "3 N", "B": "5 N"})])
    with Recording() as teacher:
        assert _gen(data, tmp_path / "out", [teacher.url], "--language", "ja") == 0
    content = seen[0]["messages"][0]["content"]
    text = content[-1]["text"]
    assert content[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    for piece in ("Which?", "B", "Hint one: F = ma.", "Hint two.", "A. 3 N", "B. 5 N", "Japanese", "option letter"):
        assert piece in text


def test_round_robin_spreads_requests_over_servers(tmp_path):
    rows = [row(f"r{i}", f"Q{i}", "yes") for i in range(12)]
    data = write_llava(tmp_path, rows)
    with LoopbackTeacher() as a, LoopbackTeacher() as b:
        assert _gen(data, tmp_path / "out", [a.url, b.url]) == 0
        assert a.requests == 6 and b.requests == 6


def test_random_transport_faults_lose_nothing(tmp_path):
    rows = [row(f"r{i}", f"Q{i}", str(i)) for i in range(60)]
    data = write_llava(tmp_path, rows)
    faults = {"500": 0.1, "429": 0.1, "malformed": 0.05, "disconnect": 0.05}
    with LoopbackTeacher(faults=faults, seed=1, retry_after=0.01) as teacher:
        assert _gen(data, tmp_path / "out", [teacher.url], "--concurrency", "16") == 0
    assert _outcomes(tmp_path / "out") == {f"r{i}": "accepted" for i in range(60)}


def test_unauthorized_stops_the_run_with_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MY_SECRET_KEY", "sk-very-secret-123")
    data = write_llava(tmp_path, [row("a", "Q #fault=auth", "B")])
    with LoopbackTeacher() as teacher:
        code = _gen(data, tmp_path / "out", [teacher.url], "--api_key_env", "MY_SECRET_KEY")
    err = capsys.readouterr().err
    assert code == 1 and "answered 401" in err and "sk-very-secret" not in err
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert b"sk-very-secret" not in f.read_bytes()


def test_retry_after_is_honoured():
    with LoopbackTeacher(retry_after=0.4) as srv:
        teacher = Teacher([srv.url], "m", backoff=0.001, max_retries=3)
        msgs = [{"role": "user", "content": "Question:\nQ #fault=429*1\nStandard answer (x):\nB\n"}]

        async def go():
            t0 = time.perf_counter()
            text = await teacher.chat(msgs)
            await teacher.aclose()
            return text, time.perf_counter() - t0

        text, elapsed = asyncio.run(go())
    assert "<CONCLUSION> B </CONCLUSION>" in text
    assert elapsed >= 0.4 and teacher.usage.retries == 1 and teacher.usage.faults == {"http_429": 1}


def test_config_errors_are_not_retried():
    with LoopbackTeacher() as srv:
        teacher = Teacher([srv.url], "m", backoff=0.001)
        async def go():
            try:
                await teacher.chat([{"role": "user", "content": "Question:\nQ #fault=auth\n"}])
            finally:
                await teacher.aclose()

        with pytest.raises(TeacherConfigError, match="401"):
            asyncio.run(go())
        assert srv.requests == 1


def test_teacher_error_rejects_are_resent_only_when_asked(tmp_path):
    data = write_llava(tmp_path, [row("down", "Q #fault=500*3", "B")])
    with LoopbackTeacher() as teacher:
        assert _gen(data, tmp_path / "out", [teacher.url], "--max_retries", "1") == 0
        assert _outcomes(tmp_path / "out") == {"down": "teacher_error"}
        assert _gen(data, tmp_path / "out", [teacher.url], "--max_retries", "1") == 0  # nothing to do
        assert teacher.requests == 2
        assert _gen(data, tmp_path / "out", [teacher.url], "--retry_teacher_errors") == 0
    assert _outcomes(tmp_path / "out") == {"down": "accepted"}
