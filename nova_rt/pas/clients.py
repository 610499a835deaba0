"""PAS chat clients: a local HF causal LM (batched `generate`) and an OpenAI-compatible chat-completions endpoint.

Both expose `stream(conversations, max_new_tokens=, temperature=, reply_prefix=, json_reply=)`, which yields
`(index, text_or_exception)` as each conversation finishes, so the caller writes every finished row at once: one
failed request costs one row, a crash only the rows in flight. `chat(...)` collects the same results into a list.

Structured replies: the HF client forces `reply_prefix` as the start of the assistant turn (the returned text starts
with it); the HTTP client, with no standard prefill, ignores it and with `json_mode=True` sends `response_format:
{"type": "json_object"}` on requests marked `json_reply`. The HTTP client uses only urllib; it retries connection
errors, timeouts, HTTP 408/429/5xx and malformed replies with exponential backoff (backoff_s * 2^attempt, capped at
max_backoff_s, or a smaller Retry-After) and fails at once on other HTTP errors. Details: docs/stages.md#pas-clients.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)
Conversation = list[dict]


class ChatClientError(RuntimeError):
    """A request failed for good (after retries, or with an error a retry cannot fix)."""


class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: float | None = None):
        super().__init__(msg)
        self.retry_after = retry_after


class ChatClient:
    """Base class: subclasses implement `stream`."""

    def stream(self, conversations: Sequence[Conversation], *, max_new_tokens: int, temperature: float = 0.0,
               reply_prefix: str = "", json_reply: bool = False) -> Iterator[tuple[int, str | BaseException]]:
        raise NotImplementedError

    def chat(self, conversations: Sequence[Conversation], *, max_new_tokens: int, temperature: float = 0.0,
             reply_prefix: str = "", json_reply: bool = False) -> list[str | BaseException]:
        out: list[str | BaseException] = [ChatClientError("no result")] * len(conversations)
        for i, res in self.stream(conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                  reply_prefix=reply_prefix, json_reply=json_reply):
            out[i] = res
        return out


class HFChatClient(ChatClient):
    """Local causal LM through `nova_rt.models.loading.load_causal_lm`; left-padded batched generation."""

    def __init__(self, model_path: str, *, dtype: str = "float32", batch_size: int = 8, top_p: float = 0.95,
                 repetition_penalty: float = 1.0, seed: int = 0, tiny: dict | None = None, model=None,
                 tokenizer=None):
        import torch

        if model is None:
            from nova_rt.models.loading import load_causal_lm

            model, tokenizer = load_causal_lm(model_path, dtype=dtype, attn_impl="sdpa", seed=seed, tiny=tiny)
        self.model, self.tok = model.eval(), tokenizer
        self.tok.padding_side = "left"  # generation appends on the right: every row must end at the same column
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.batch_size, self.top_p, self.rep = batch_size, top_p, repetition_penalty
        self._gen = torch.Generator().manual_seed(seed)

    def _generate(self, convs: Sequence[Conversation], max_new_tokens: int, temperature: float,
                  reply_prefix: str = "") -> list[str]:
        import torch

        texts = [self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) + reply_prefix
                 for c in convs]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id,
                      repetition_penalty=self.rep)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=self.top_p)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self._gen)))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out_BT = self.model.generate(**enc, **kwargs)
        new_BT = out_BT[:, enc["input_ids"].shape[1]:]
        if reply_prefix:  # keep the generated text exactly as it continues the prefix
            return [reply_prefix + t.rstrip() for t in self.tok.batch_decode(new_BT, skip_special_tokens=True)]
        return [t.strip() for t in self.tok.batch_decode(new_BT, skip_special_tokens=True)]

    def stream(self, conversations, *, max_new_tokens, temperature=0.0, reply_prefix="", json_reply=False):
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start:start + self.batch_size]
            try:
                results: list = self._generate(chunk, max_new_tokens, temperature, reply_prefix)
            except (RuntimeError, ValueError) as exc:  # e.g. an over-long prompt: fail this batch, keep going
                log.warning("HF generation failed for items %d..%d: %s", start, start + len(chunk) - 1, exc)
                results = [ChatClientError(f"generation failed: {exc}")] * len(chunk)
            yield from ((start + j, r) for j, r in enumerate(results))


class OpenAIChatClient(ChatClient):
    """POST {base_url}/chat/completions with `concurrency` requests in flight; see the module docstring."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 retries: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 30.0, timeout_s: float = 60.0,
                 json_mode: bool = False):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"pas.generator.base_url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("pas.generator: need concurrency >= 1, retries >= 0 and timeout_s > 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.concurrency, self.retries = concurrency, retries
        self.backoff_s, self.max_backoff_s, self.timeout_s = backoff_s, max_backoff_s, timeout_s
        self.json_mode = json_mode

    def _post_once(self, payload: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            if exc.code in (408, 409, 429) or exc.code >= 500:
                ra = exc.headers.get("Retry-After") if exc.headers else None
                raise _Retryable(f"HTTP {exc.code}: {detail}", float(ra) if ra and ra.isdigit() else None) from None
            raise ChatClientError(f"{self.url}: HTTP {exc.code}: {detail}") from None
        except TimeoutError as exc:
            raise _Retryable(f"timed out after {self.timeout_s:g} s ({exc})") from None
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            raise _Retryable(f"connection error: {exc}") from None
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as exc:
            raise _Retryable(f"malformed reply ({type(exc).__name__}): {body[:120]!r}") from None
        if not isinstance(content, str):
            raise _Retryable(f"malformed reply: content is {type(content).__name__}")
        return content

    def complete(self, messages: Conversation, *, max_new_tokens: int, temperature: float = 0.0,
                 json_reply: bool = False) -> str:
        """One chat completion with retries; raises ChatClientError when every attempt failed."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature}
        if json_reply and self.json_mode:
            body["response_format"] = {"type": "json_object"}
        payload = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._post_once(payload).strip()
            except _Retryable as exc:
                last = str(exc)
                if attempt == self.retries:
                    break
                delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
                if exc.retry_after is not None:
                    delay = min(delay, exc.retry_after)
                log.info("request to %s failed (%s); retry %d/%d in %.2f s", self.url, last, attempt + 1,
                         self.retries, delay)
                time.sleep(delay)
        raise ChatClientError(f"{self.url}: failed after {self.retries + 1} attempts: {last}")

    def stream(self, conversations, *, max_new_tokens, temperature=0.0, reply_prefix="", json_reply=False):
        pool = cf.ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {pool.submit(self.complete, c, max_new_tokens=max_new_tokens, temperature=temperature,
                                   json_reply=json_reply): i
                       for i, c in enumerate(conversations)}
            for fut in cf.as_completed(futures):
                exc = fut.exception()
                yield futures[fut], (exc if exc is not None else fut.result())
        finally:  # the caller stopped early (crash, KeyboardInterrupt): drop queued requests, don't wait for them
            pool.shutdown(wait=False, cancel_futures=True)


class LazyChatClient(ChatClient):
    """Builds the real client on the first non-empty request: a fully resumed run never loads the model."""

    def __init__(self, factory):
        self._factory, self._client = factory, None

    def stream(self, conversations, *, max_new_tokens, temperature=0.0, reply_prefix="", json_reply=False):
        if not conversations:
            return
        if self._client is None:
            self._client = self._factory()
        yield from self._client.stream(conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                       reply_prefix=reply_prefix, json_reply=json_reply)


def build_client(gen, hf_model_path: str, seed: int = 0, tiny: dict | None = None) -> ChatClient:
    """The client described by a `pas.generator` config section. hf_model_path: the resolved local model for the
    hf client (pas.generator.model, or model.path when that is empty); `tiny` configures tiny:ARCH models."""
    if gen.client == "hf":
        return HFChatClient(hf_model_path, tiny=tiny, dtype=gen.dtype, batch_size=gen.batch_size, top_p=gen.top_p,
                            repetition_penalty=gen.repetition_penalty, seed=seed)
    if gen.client == "openai":
        if not gen.model:
            raise ValueError("pas.generator.model: the model name is required for the openai client")
        return OpenAIChatClient(gen.base_url, gen.model, api_key_env=gen.api_key_env, concurrency=gen.concurrency,
                                retries=gen.retries, backoff_s=gen.backoff_s, timeout_s=gen.timeout_s,
                                json_mode=gen.json_mode)
    raise ValueError(f"pas.generator.client must be 'hf' or 'openai', got {gen.client!r}")
