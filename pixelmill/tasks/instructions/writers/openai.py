"""The HTTP instruction writer for any OpenAI-compatible endpoint (no openai package needed: httpx)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

from pixelmill.registry import register
from pixelmill.tasks.instructions.answer import CHAT_SYSTEM_PROMPT, PROMPT_SEPARATOR, STOP, WriterAnswer
from pixelmill.tasks.instructions.writers.base import (
    InstructionWriter,
    WriterAuthError,
    WriterFatalError,
    _read_few_shot,
)

logger = logging.getLogger(__name__)

SleepFn = Callable[[float], Awaitable[None]]


def _safe_url(url: str) -> str:
    """The URL without user:password, for messages and reprs."""
    return re.sub(r"//[^/@]*@", "//", url)


@register("writer", "openai")
class OpenAIInstructionWriter(InstructionWriter):
    """Writes instructions through any OpenAI-compatible HTTP API (OpenAI, vLLM, TGI, llama.cpp...).

    ``api="completions"`` POSTs ``{base_url}/completions`` with the InstructPix2Pix prompt
    (few-shot prefix + caption + ``"\\n##\\n"``) and the reference sampling settings;
    ``api="chat"`` POSTs ``{base_url}/chat/completions`` with a system message that
    explains the answer format (plus the few-shot text, if any) and the caption as the
    user message. Requests run concurrently (at most ``concurrency`` at a time) on an
    ``httpx.AsyncClient``; 429, 5xx, timeouts and connection errors are retried up to
    ``retries`` times, waiting ``backoff * 2**k`` seconds (capped at ``max_backoff``; a
    ``Retry-After`` header in seconds wins when present). Exhausted retries give the row
    the error ``<cause>_retries_exhausted`` (``http_429``, ``http_503``, ``timeout``,
    ``connection_error``). Other 4xx answers are row errors ``http_<code>``.
    401/403 raise ``WriterAuthError`` and 404 raises ``WriterFatalError`` at once (every
    row would fail), cancelling the other requests.

    The API key is read from the environment variable ``api_key_env`` when each batch
    starts and is sent only as ``Authorization: Bearer``; it is never stored on the
    writer, logged, or put into errors or reprs. Without the variable, requests go out
    without authorization (fine for a local server).

    Args:
        base_url: API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: model name sent with each request.
        api: ``completions`` or ``chat``.
        api_key_env: name of the environment variable holding the key.
        max_tokens, temperature, top_p, frequency_penalty: sampling settings (the
            InstructPix2Pix reference values by default).
        concurrency: most requests in flight at once.
        timeout: seconds per request.
        retries: retries after the first attempt.
        backoff: first retry delay in seconds; doubles each retry.
        max_backoff: longest wait between attempts.
        few_shot_file: text prepended to completion prompts / added to the chat system message.
        system_prompt: replaces the built-in chat system message.
        send_seed: send the row seed as ``seed`` (for servers that honour it, e.g. vLLM).
        sleep: async sleep used between retries (tests inject a recorder).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api: str = "completions",
        api_key_env: str = "OPENAI_API_KEY",
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 1.0,
        frequency_penalty: float = 0.1,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        few_shot_file: str | None = None,
        system_prompt: str | None = None,
        send_seed: bool = False,
        sleep: SleepFn | None = None,
    ) -> None:
        if not base_url or not model:
            raise ValueError("writer_options.base_url and writer_options.model are required for writer 'openai'")
        if api not in ("completions", "chat"):
            raise ValueError(f"writer_options.api must be 'completions' or 'chat', not {api!r}")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("writer_options: need concurrency >= 1, retries >= 0, timeout > 0, backoff >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api = api
        self.api_key_env = api_key_env
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.frequency_penalty = float(frequency_penalty)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.few_shot_file = few_shot_file
        self.system_prompt = system_prompt
        self.send_seed = bool(send_seed)
        self._sleep: SleepFn = sleep or asyncio.sleep
        self._prefix: str | None = None
        self.requests_made = 0

    def __repr__(self) -> str:
        return (f"OpenAIInstructionWriter(base_url={_safe_url(self.base_url)!r}, model={self.model!r}, "
                f"api={self.api!r}, api_key_env={self.api_key_env!r})")

    @property
    def model_name(self) -> str:
        return self.model

    def setup(self) -> None:
        if self._prefix is None:
            self._prefix = _read_few_shot(self.few_shot_file)

    @property
    def url(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"

    def request_body(self, caption: str, seed: int | None = None) -> dict[str, Any]:
        """The JSON body sent for one caption."""
        self.setup()
        body: dict[str, Any] = {"model": self.model}
        if self.api == "chat":
            system = self.system_prompt or CHAT_SYSTEM_PROMPT
            if self._prefix:
                system += ("\n\nMore examples, each written as caption, ##, instruction, %%, "
                           "edited caption, END:\n\n" + self._prefix)
            body["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": caption}]
        else:
            body["prompt"] = (self._prefix or "") + caption + PROMPT_SEPARATOR
        body.update(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    frequency_penalty=self.frequency_penalty, stop=[STOP])
        if self.send_seed and seed is not None:
            body["seed"] = int(seed) % 2**31
        return body

    def write(self, captions: list[str], seeds: list[int]) -> list[WriterAnswer]:
        """Run ``awrite`` to completion (on a helper thread if this thread already runs an event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.awrite(captions, seeds))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.awrite(captions, seeds)).result()

    async def awrite(self, captions: list[str], seeds: list[int]) -> list[WriterAnswer]:
        """One answer per caption; raises ``WriterFatalError`` when the endpoint refuses all work."""
        import httpx

        self.setup()
        if len(captions) != len(seeds):
            raise ValueError("captions and seeds differ in length")
        key = os.environ.get(self.api_key_env) or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        semaphore = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout), limits=limits) as client:
            tasks = [asyncio.create_task(self._one(client, semaphore, c, s, key is not None))
                     for c, s in zip(captions, seeds)]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _one(self, client: Any, semaphore: asyncio.Semaphore, caption: str, seed: int,
                   has_key: bool) -> WriterAnswer:
        import httpx

        body = self.request_body(caption, seed)
        async with semaphore:
            cause = "unknown"
            for attempt in range(self.retries + 1):
                retry_after: float | None = None
                self.requests_made += 1
                try:
                    response = await client.post(self.url, json=body)
                except httpx.TimeoutException:
                    cause = "timeout"
                except httpx.TransportError:
                    cause = "connection_error"
                else:
                    status = response.status_code
                    if status in (401, 403):
                        raise self._auth_error(status, has_key)
                    if status == 404:
                        raise WriterFatalError(
                            f"not found (HTTP 404) at {_safe_url(self.url)}: check writer_options.base_url "
                            f"and writer_options.model ({self.model!r})")
                    if status == 429 or status >= 500:
                        cause = f"http_{status}"
                        retry_after = _retry_after(response.headers.get("retry-after"))
                    elif status >= 400:
                        message = _redact(_error_message(response), os.environ.get(self.api_key_env))
                        return WriterAnswer(raw=None, error=f"http_{status}: {message}"[:300])
                    else:
                        return self._answer(response)
                if attempt < self.retries:
                    delay = min(self.max_backoff, self.backoff * 2**attempt)
                    if retry_after is not None:
                        delay = min(self.max_backoff, retry_after)
                    logger.debug("openai writer: %s, retry %d of %d in %.2f s", cause, attempt + 1,
                                 self.retries, delay)
                    await self._sleep(delay)
            return WriterAnswer(raw=None, error=f"{cause}_retries_exhausted")

    def _auth_error(self, status: int, has_key: bool) -> WriterAuthError:
        what = "unauthorized" if status == 401 else "forbidden"
        hint = "" if has_key else " (it is not set)"
        return WriterAuthError(f"{what}: check the API key in ${self.api_key_env}{hint} "
                               f"(HTTP {status} from {_safe_url(self.url)}, model {self.model!r})")

    def _answer(self, response: Any) -> WriterAnswer:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            return WriterAnswer(raw=None, error="bad_response")
        if not isinstance(text, str):
            return WriterAnswer(raw=None, error="bad_response")
        model = data.get("model") if isinstance(data.get("model"), str) else None
        return WriterAnswer(raw=text, finish_reason=choice.get("finish_reason"), model=model)


def _redact(text: str, secret: str | None) -> str:
    """``text`` with any occurrence of ``secret`` (and of its first 8 characters) masked."""
    if secret:
        text = text.replace(secret, "***")
        if len(secret) >= 8:
            text = text.replace(secret[:8], "***")
    return text


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_message(response: Any) -> str:
    try:
        err = response.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg) if msg else response.reason_phrase
    except (ValueError, AttributeError):
        return response.reason_phrase or "error"
