"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1 serving a tiny causal LM.

Faults (HTTP 500, a reply slower than the client timeout, a body that is not JSON) are injected per prompt; the
generation step must keep every finished row and a rerun must request exactly the missing ids. The expected text
of every row is recomputed in-process from the same tiny model, so a row written under the wrong id fails.
"""

from __future__ import annotations

import os
import random

import pytest

from nova_rt.pas.clients import ChatClientError, OpenAIChatClient
from nova_rt.pas.generate import run_generation
from nova_rt.pas.records import read_jsonl
from nova_rt.pas.template import GoldenExample, generation_messages
from tests.pas.chat_server import ChatServer, tiny_model_responder

SEED = int.from_bytes(os.urandom(4), "little")
WORDS = "alpha river copper lantern violet orbit maple quartz ember harbor tundra falcon cedar prism".split()


@pytest.fixture(scope="module")
def generate():
    return tiny_model_responder(seed=SEED % 1000)


def _client(url: str, **kw) -> OpenAIChatClient:
    args = dict(concurrency=3, retries=2, backoff_s=0.01, timeout_s=3.0)  # generous: the machine is shared
    args.update(kw)
    return OpenAIChatClient(url, "tiny", **args)


def test_retry_after_server_error(generate):
    msgs = [{"role": "user", "content": "please [e500] explain"}]
    with ChatServer(generate) as srv:
        srv.faults["[e500]"] = ["500", "500"]
        out = _client(srv.base_url).complete(msgs, max_new_tokens=8)
        assert srv.requests.count(msgs[0]["content"]) == 3, srv.requests
    assert out == generate(msgs, 8).strip()


@pytest.mark.parametrize("fault, needle", [("sleep", "timed out"), ("badjson", "malformed"),
                                           ("nochoice", "malformed"), ("500", "HTTP 500")])
def test_fault_exhausts_retries(generate, fault, needle):
    msgs = [{"role": "user", "content": "[bad] question"}]
    with ChatServer(generate, sleep_s=60) as srv:
        srv.faults["[bad]"] = [fault] * 3
        with pytest.raises(ChatClientError, match=needle):
            _client(srv.base_url, retries=1).complete(msgs, max_new_tokens=8)
        assert len(srv.requests) == 2  # first attempt + one retry


def test_client_error_is_not_retried(generate):
    with ChatServer(generate) as srv:
        client = OpenAIChatClient(srv.base_url + "/wrong", "tiny", retries=3, backoff_s=0.01)
        with pytest.raises(ChatClientError, match="HTTP 404"):
            client.complete([{"role": "user", "content": "x"}], max_new_tokens=4)
        assert srv.hits == 1


def test_bad_config_names_field():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIChatClient("127.0.0.1:8000", "m")


def test_generation_resumes_after_faults(generate, tmp_path):
    rng = random.Random(SEED)
    n = rng.randint(9, 14)
    rows = [{"id": f"r{i}", "prompt": f"[p{i}] " + " ".join(rng.choices(WORDS, k=rng.randint(1, 9))),
             "category": rng.choice(["a", "b"])} for i in range(n)]
    seeds = {"a": [GoldenExample("a", "Say hi.", "Keep it friendly.")],
             "b": [GoldenExample("b", "Add 2 and 3.", "Show the steps.")]}
    retried, slow, broken = rng.sample(range(n), 3)
    out = tmp_path / "generated.jsonl"
    with ChatServer(generate, sleep_s=60) as srv:
        srv.faults[f"[p{retried}]"] = ["500"]  # recovers within the retries
        srv.faults[f"[p{slow}]"] = ["sleep", "sleep"]  # times out on both attempts
        srv.faults[f"[p{broken}]"] = ["badjson", "badjson"]
        counts = run_generation(rows, _client(srv.base_url, retries=1), seeds, out, num_shots=1, max_new_tokens=8)
        assert counts["generated"] == n - 2 and counts["failed"] == 2, (SEED, counts)
        first = [r["id"] for r in read_jsonl(out)]
        assert sorted(first) == sorted(f"r{i}" for i in range(n) if i not in (slow, broken)), SEED

        srv.requests.clear()  # rerun: the server is healthy now
        counts = run_generation(rows, _client(srv.base_url, retries=1), seeds, out, num_shots=1, max_new_tokens=8)
        assert counts["done_before"] == n - 2 and counts["generated"] == 2, (SEED, counts)
        resent = sorted(r.split("]")[0] + "]" for r in srv.requests)
        assert resent == sorted([f"Prompt: [p{slow}]", f"Prompt: [p{broken}]"]), (SEED, srv.requests)

    final = list(read_jsonl(out))
    assert sorted(r["id"] for r in final) == sorted(r["id"] for r in rows), SEED
    by_id = {r["id"]: r for r in rows}
    for row in final:  # each row holds the model's reply to *its own* prompt
        msgs = generation_messages(by_id[row["id"]]["prompt"], seeds[by_id[row["id"]]["category"]][:1])
        assert row["raw"] == generate(msgs, 8).strip(), (SEED, row["id"])
        assert row["prompt"] == by_id[row["id"]]["prompt"]


@pytest.mark.parametrize("json_mode", [False, True])
def test_json_mode_sends_response_format_only_on_json_requests(generate, json_mode):
    msgs = [{"role": "user", "content": "judge this"}]
    with ChatServer(generate) as srv:
        client = _client(srv.base_url, json_mode=json_mode)
        client.chat([msgs], max_new_tokens=4, json_reply=True, reply_prefix='{"reason": "')
        client.chat([msgs], max_new_tokens=4)
        formats = [b.get("response_format") for b in srv.bodies]
    assert formats == ([{"type": "json_object"}, None] if json_mode else [None, None]), formats
