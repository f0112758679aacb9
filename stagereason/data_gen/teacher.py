"""An async client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang).

Transport faults (429, 5xx, timeouts, connection errors, malformed
responses) are retried here with exponential backoff and jitter, honouring
``Retry-After``; they never count as attempts of an example. Several base
URLs are used round-robin, and a retry goes to the next one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import itertools
import json
import logging
import os
import random
import time

__all__ = ["Teacher", "TeacherError", "TeacherConfigError", "TeacherUsage"]

logger = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """A request that failed for good (retries exhausted, or a non-retryable 4xx)."""


class TeacherConfigError(TeacherError, ValueError):
    """The endpoint refuses us (401/403/404): a wrong key, model or URL. The run stops."""


@dataclasses.dataclass
class TeacherUsage:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    faults: dict[str, int] = dataclasses.field(default_factory=dict)

    def count_fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1


def _retry_after(headers) -> float | None:
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, parsed.timestamp() - time.time())


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return body[:300].decode("utf-8", "replace")


class Teacher:
    """Chat completions with retries over one or several OpenAI-compatible servers.

    Plain HTTP through aiohttp: the OpenAI SDK's request validation costs
    several milliseconds per request with an image attached (bench/datagen.py).

    Args:
        base_urls: one or more ``http(s)://host:port/v1`` endpoints, used round-robin.
        model: the model name to ask for.
        api_key_env: environment variable holding the key (never logged); a
            missing variable sends ``EMPTY``, which local servers accept.
        timeout: seconds per request.
        max_retries: transport retries per request before giving up.
        backoff: first backoff in seconds; doubles per retry, with jitter.
        max_backoff: cap on one wait (a longer ``Retry-After`` is honoured up to 4x this).
        temperature, max_tokens: sampling settings sent with every request.
    """

    def __init__(self, base_urls: list[str], model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 8, backoff: float = 0.5, max_backoff: float = 30.0,
                 temperature: float = 0.7, max_tokens: int = 2048):
        if not base_urls:
            raise ValueError("--teacher_base_url is required for a teacher (one or more URLs)")
        self.model, self.timeout = model, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self._key = os.environ.get(api_key_env) or "EMPTY"
        self._urls = [u.rstrip("/") + "/chat/completions" for u in base_urls]
        self._next = itertools.cycle(range(len(self._urls)))
        self._session = None
        self.usage = TeacherUsage()

    def _get_session(self):
        import aiohttp

        if self._session is None:  # created inside the running event loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Authorization": f"Bearer {self._key}"},
            )
        return self._session

    async def chat(self, messages: list[dict], *, max_tokens: int | None = None,
                   temperature: float | None = None) -> str:
        """Send one chat completion and return the text of its first choice.

        Raises:
            TeacherConfigError: 401/403/404 from the endpoint.
            TeacherError: a non-retryable 4xx, or retries exhausted.
        """
        import aiohttp

        payload = json.dumps({
            "model": self.model, "messages": messages, "max_tokens": max_tokens or self.max_tokens,
            "temperature": self.temperature if temperature is None else temperature,
        }).encode()
        session, last = self._get_session(), "no attempt"
        for retry in range(self.max_retries + 1):
            url = self._urls[next(self._next)]
            wait = None
            self.usage.requests += 1
            try:
                async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as resp:
                    status, headers, body = resp.status, resp.headers, await resp.read()
            except asyncio.TimeoutError:
                kind = "timeout"
            except aiohttp.ClientError as err:
                kind, last = "connection", f"connection: {type(err).__name__}"
            else:
                if status == 200:
                    try:
                        data = json.loads(body)
                        text = data["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        kind, last = "malformed_response", f"malformed response ({type(err).__name__}: {err})"
                    else:
                        usage = data.get("usage") or {}
                        self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                        self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
                        return text
                elif status in (401, 403, 404):
                    raise TeacherConfigError(
                        f"teacher at {url} answered {status} ({_error_message(body)}); check --teacher_model, "
                        "--teacher_base_url and the API key variable")
                elif status == 429 or status >= 500 or status in (408, 409):
                    kind, wait = f"http_{status}", _retry_after(headers)
                else:
                    raise TeacherError(f"teacher answered {status}: {_error_message(body)}")
            self.usage.count_fault(kind)
            if kind not in ("malformed_response", "connection"):
                last = kind
            if retry == self.max_retries:
                break
            self.usage.retries += 1
            delay = min(self.max_backoff, self.backoff * 2 ** retry)
            delay = random.uniform(delay / 2, delay)
            if wait is not None:
                delay = max(delay, min(wait, 4 * self.max_backoff))
            await asyncio.sleep(delay)
        raise TeacherError(f"gave up after {self.max_retries} retries; last error: {last}")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
