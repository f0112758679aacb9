"""A local OpenAI-compatible teacher on 127.0.0.1, with fault injection.

It speaks the chat-completions protocol over real HTTP and writes a
four-stage trace whose conclusion is the standard answer found in the
prompt, so ``stagereason gen`` can be tried, tested and benchmarked without a
real teacher. Faults are injected by the server itself:

* at random, by rate: ``LoopbackTeacher(faults={"500": 0.1, "429": 0.1})``;
* per example, by a directive in the question text: ``#fault=refusal``
  (every request for it) or ``#fault=500*2`` (the first two, then normal).

Fault kinds: ``500``, ``429`` (with ``Retry-After``), ``slow`` (answers after
``slow_seconds``), ``malformed`` (invalid JSON body), ``disconnect`` (closes
the connection), ``auth`` (401), ``empty`` (empty content), ``broken_tags``,
``wrong_answer``, ``refusal``. Judge prompts are answered by
``answers_match``, or forced with ``#judge=yes`` / ``#judge=no``.

Run it alone: ``python -m stagereason.data_gen.loopback --port 8000 --latency 0.2``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import threading
import time
from collections import Counter

from stagereason.stages import StagedTrace, answers_match

__all__ = ["LoopbackTeacher", "FAULT_KINDS"]

FAULT_KINDS = ("500", "429", "slow", "malformed", "disconnect", "auth", "empty", "broken_tags", "wrong_answer",
               "refusal")
_DIRECTIVE = re.compile(r"#fault=([a-z_0-9]+)(?:\*(\d+))?")
_ANSWER = re.compile(r"Standard answer[^\n]*:\n(.*?)\n", re.S)
_QUESTION = re.compile(r"Question:\n(.*?)\n", re.S)
_CANDIDATE = re.compile(r"Candidate answer:\n(.*?)\n\s*\nReply", re.S)


def _prompt_text(body: dict) -> str:
    parts = []
    for msg in body.get("messages", []):
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"]
    return "\n".join(parts)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error"}


class _Request:
    """One parsed HTTP/1.1 request and a way to answer it."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer

    def send(self, code: int, payload: bytes, headers: dict | None = None) -> None:
        head = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)


class LoopbackTeacher:
    """Start with ``with LoopbackTeacher(...) as t: ... t.url``; see the module docstring.

    An asyncio server on its own thread: one event loop, like the servers it
    stands in for, so a benchmark measures the client rather than this server.

    Args:
        latency: seconds each answer takes.
        faults: random fault rates by kind (each in 0..1, summing to at most 1).
        seed: seeds the random faults.
        retry_after: the ``Retry-After`` seconds sent with a 429.
        slow_seconds: how long a ``slow`` answer takes (longer than the client's timeout).
        port: 0 picks a free port.
    """

    def __init__(self, *, latency: float = 0.0, faults: dict[str, float] | None = None, seed: int = 0,
                 retry_after: float = 0.05, slow_seconds: float = 3.0, host: str = "127.0.0.1", port: int = 0):
        unknown = set(faults or {}) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        self.latency, self.faults = latency, dict(faults or {})
        self.retry_after, self.slow_seconds = retry_after, slow_seconds
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._directive_hits: Counter = Counter()
        self.served: Counter = Counter()  # by outcome kind ("ok", "judge", or a fault kind)
        self.requests = 0
        self._sock = socket.create_server((host, port), backlog=512)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> LoopbackTeacher:
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve(ready))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def serve_forever(self) -> None:
        """Serve on the calling thread until interrupted."""
        asyncio.run(self._serve(threading.Event()))

    async def _serve(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self._sock)
        ready.set()
        await self._stop.wait()
        server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:  # open keep-alive connections and sleeping answers
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> LoopbackTeacher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path = (line.decode("latin-1").split() + ["", ""])[:2]
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                req = _Request(writer)
                if method == "GET" and path.rstrip("/").endswith("/models"):
                    req.send(200, json.dumps({"object": "list", "data": [{"id": "loopback"}]}).encode())
                elif method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
                    req.send(404, b'{"error": {"message": "not found"}}')
                else:
                    try:
                        body = json.loads(raw)
                    except json.JSONDecodeError:
                        req.send(400, b'{"error": {"message": "request body is not JSON"}}')
                    else:
                        if await self._handle(req, body) == "disconnect":
                            break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def _pick_fault(self, text: str) -> str | None:
        m = _DIRECTIVE.search(text)
        with self._lock:
            self.requests += 1
            if m:
                kind, times = m.group(1), m.group(2)
                key = _QUESTION.search(text + "\n")
                key = key.group(1) if key else text
                self._directive_hits[key] += 1
                if times is None or self._directive_hits[key] <= int(times):
                    return kind
                return None
            r, acc = self._rng.random(), 0.0
            for kind, rate in self.faults.items():
                acc += rate
                if r < acc:
                    return kind
        return None

    async def _handle(self, req: _Request, body: dict) -> str | None:
        text = _prompt_text(body)
        if self.latency:
            await asyncio.sleep(self.latency)
        judge = _CANDIDATE.search(text)
        fault = None if judge else self._pick_fault(text)
        with self._lock:
            self.served["judge" if judge else fault or "ok"] += 1
        if fault == "500":
            return req.send(500, b'{"error": {"message": "injected server error"}}')
        if fault == "429":
            return req.send(429, b'{"error": {"message": "injected rate limit"}}',
                            {"Retry-After": f"{self.retry_after:g}"})
        if fault == "auth":
            return req.send(401, b'{"error": {"message": "invalid api key"}}')
        if fault == "malformed":
            return req.send(200, b'{"id": "x", "choices": [ {"message": ')
        if fault == "disconnect":
            return "disconnect"
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        if judge:
            forced = re.search(r"#judge=(yes|no)", text)
            answer = _ANSWER.search(text)
            agree = forced.group(1) == "yes" if forced else bool(
                answer and answers_match(judge.group(1).strip(), answer.group(1).strip()))
            content = "yes" if agree else "no"
        else:
            content = self._trace(text, fault)
        payload = {
            "id": f"loopback-{self.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "loopback"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": (len(text) + len(content)) // 4},
        }
        req.send(200, json.dumps(payload).encode())
        return None

    @staticmethod
    def _trace(text: str, fault: str | None) -> str:
        if fault == "empty":
            return ""
        answer = _ANSWER.search(text)
        answer = answer.group(1).strip() if answer else "unknown"
        question = _QUESTION.search(text)
        question = _DIRECTIVE.sub("", question.group(1)).strip() if question else "the question"
        if fault == "wrong_answer":
            answer = "definitely not " + answer
        conclusion = "I'm sorry, but I can't determine that from the image." if fault == "refusal" else answer
        trace = StagedTrace(
            summary=f"I will look at the image and work out: {question[:120]}",
            caption="The image shows the objects the question refers to.",
            reasoning=f"Looking at the relevant part of the image step by step, the answer is {answer}.",
            conclusion=conclusion,
        ).render()
        if fault == "broken_tags":
            trace = trace.replace("</CAPTION>", "", 1)
        return trace


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run a loopback OpenAI-compatible teacher on 127.0.0.1.")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    p.add_argument("--fault", action="append", default=[], metavar="KIND=RATE", help="e.g. 500=0.05 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    faults = {k: float(v) for k, v in (f.split("=", 1) for f in args.fault)}
    teacher = LoopbackTeacher(latency=args.latency, faults=faults, seed=args.seed, port=args.port)
    print(teacher.url, flush=True)
    try:
        teacher.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
