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


def _retry_after(err) -> float | None:
    response = getattr(err, "response", None)
    if response is None:
        return None
    headers = response.headers
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
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class Teacher:
    """Chat completions with retries over one or several OpenAI-compatible servers.

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
        import openai

        if not base_urls:
            raise ValueError("--teacher_base_url is required for a teacher (one or more URLs)")
        self.model, self.timeout = model, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        key = os.environ.get(api_key_env) or "EMPTY"
        # openai's default pool allows 1000 connections, enough for any sane --concurrency.
        self._clients = [openai.AsyncOpenAI(base_url=u, api_key=key, max_retries=0, timeout=timeout)
                         for u in base_urls]
        self._urls = list(base_urls)
        self._next = itertools.cycle(range(len(self._clients)))
        self.usage = TeacherUsage()

    async def chat(self, messages: list[dict], *, max_tokens: int | None = None,
                   temperature: float | None = None) -> str:
        """Send one chat completion and return the text of its first choice.

        Raises:
            TeacherConfigError: 401/403/404 from the endpoint.
            TeacherError: a non-retryable 4xx, or retries exhausted.
        """
        import openai

        last = "no attempt"
        for retry in range(self.max_retries + 1):
            idx = next(self._next)
            client, url = self._clients[idx], self._urls[idx]
            wait = None
            try:
                self.usage.requests += 1
                resp = await client.chat.completions.create(
                    model=self.model, messages=messages,
                    max_tokens=max_tokens or self.max_tokens,
                    temperature=self.temperature if temperature is None else temperature,
                )
                if not getattr(resp, "choices", None):
                    raise ValueError("response has no choices")
                if resp.usage is not None:
                    self.usage.prompt_tokens += resp.usage.prompt_tokens or 0
                    self.usage.completion_tokens += resp.usage.completion_tokens or 0
                return resp.choices[0].message.content or ""
            except openai.APIStatusError as err:
                code = err.status_code
                if code in (401, 403, 404):
                    raise TeacherConfigError(
                        f"teacher at {url} answered {code} ({err.message}); check --teacher_model, "
                        "--teacher_base_url and the API key variable") from err
                if code != 429 and code < 500 and code not in (408, 409):
                    raise TeacherError(f"teacher answered {code}: {err.message}") from err
                kind, wait = f"http_{code}", _retry_after(err)
            except openai.APITimeoutError:
                kind = "timeout"
            except openai.APIConnectionError:
                kind = "connection"
            except (openai.APIResponseValidationError, ValueError, TypeError, KeyError, AttributeError) as err:
                kind = "malformed_response"
                last = f"malformed response: {err}"
            self.usage.count_fault(kind)
            last = last if kind == "malformed_response" else kind
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
        for c in self._clients:
            await c.close()
