"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for the PAS client tests.

It answers POST /v1/chat/completions with a `responder(messages, max_tokens) -> str` (a tiny causal LM generating
greedily, or a deterministic function) and can inject faults per request: for a marker string found in the last
user message, a queue of actions is popped one per request:
    "500"      -> HTTP 500 with a JSON error body
    "sleep"    -> wait `sleep_s` (or until the server stops) before answering: longer than the client timeout
    "badjson"  -> HTTP 200 with a body that is not JSON
    "nochoice" -> HTTP 200 with JSON that has no choices
Every request's last user message is logged in `requests` (and every request at all counted in `hits`), so tests
can see what was (re)sent.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, responder, sleep_s: float = 60.0):
        self.responder, self.sleep_s = responder, sleep_s
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.requests: list[str] = []
        self.bodies: list[dict] = []  # every request body, parsed
        self.hits = 0
        self._release = threading.Event()  # set on exit: sleeping handlers end at once
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_fault(self, text: str) -> str | None:
        with self._lock:
            self.requests.append(text)
            for marker, queue in self.faults.items():
                if marker in text and queue:
                    return queue.pop(0)
        return None

    def _send(self, h, code: int, body: bytes) -> None:
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and closed the socket
            pass

    def _handle(self, h) -> None:
        with self._lock:
            self.hits += 1
        if h.path != "/v1/chat/completions":
            return self._send(h, 404, b'{"error": "not found"}')
        req = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self._lock:
            self.bodies.append(req)
        messages = req["messages"]
        fault = self._next_fault(messages[-1]["content"])
        if fault == "500":
            return self._send(h, 500, b'{"error": {"message": "injected server error"}}')
        if fault == "badjson":
            return self._send(h, 200, b'{"choices": [{"message": {"content": "trunc')
        if fault == "nochoice":
            return self._send(h, 200, b'{"object": "chat.completion"}')
        if fault == "sleep":
            self._release.wait(self.sleep_s)
        with self._lock:  # one generation at a time: torch generate is not meant to run concurrently
            text = self.responder(messages, int(req.get("max_tokens", 16)))
        body = {"id": "cmpl-test", "object": "chat.completion", "model": req.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}
        self._send(h, 200, json.dumps(body).encode())


def tiny_model_responder(seed: int = 0):
    """(responder, generate) over a tiny random Llama with the byte tokenizer: greedy, at most 8 new tokens."""
    import torch

    from nova_rt.models.tiny import build_tiny_model, byte_tokenizer

    model, tok = build_tiny_model("llama", seed=seed).eval(), byte_tokenizer()

    def generate(messages, max_tokens: int) -> str:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=min(max_tokens, 8), do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return generate
