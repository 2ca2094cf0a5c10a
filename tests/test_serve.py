"""`edgellm serve` as a client sees it: a real server process on loopback serving SmolLM2-135M
(int8 weights and activations, native target), driven with the unmodified `openai` package and raw HTTP."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

import edgellm
from conftest import build

KEY = "test-key"
PARALLEL = 4
QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Who wrote Hamlet?",
             "Say hello in Spanish."]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # SmolLM2 keeps counting: an answer that runs long


@pytest.fixture(scope="module")
def smollm2_int8(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "smollm2"
    # int8 activations: their prefill and decode logits differ (the cache-reuse test needs that)
    return build(smollm2_gguf, out, "int8", target="native", max_num_tokens=512, language_group_size=32,
                 future_token_mask_size=128, jobs=2, int8_activations=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(build, *flags) -> tuple[subprocess.Popen, str]:
    """`edgellm serve build flags` on a free loopback port, once /health says it is ready."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", str(build), "--port", str(port),
                             "--alias", "smol", *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the server did not become ready"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(smollm2_int8):
    proc, base = _serve(smollm2_int8, "--parallel", str(PARALLEL), "--api-key", KEY, "--max-body", "65536")
    yield base
    proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(smollm2_int8):
    """The same build in this process: what `edgellm generate` answers."""
    model = edgellm.load(smollm2_int8)
    yield model
    model.close()


def _metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {name: float(value) for name, value in re.findall(r"^([^#\s]\S*) (\S+)$", text, re.M)}


def _chat(client, question, **kw):
    return client.chat.completions.create(model="smol", messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", 48), **kw)


def test_health_is_public_and_everything_else_needs_the_key(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(f"{server}{path}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401


def test_models_lists_the_served_build(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smol"]


def test_greedy_chat_answers_what_generate_answers(client, local):
    for question in QUESTIONS[:3]:
        answer = _chat(client, question)
        expected = local.session().generate(question, chat=True, max_new_tokens=48)
        assert answer.choices[0].message.content == expected.text
        assert answer.usage.completion_tokens == expected.gen_tokens
        assert answer.usage.prompt_tokens == expected.prompt_tokens
    assert "4" in _chat(client, "What is 2 + 2?").choices[0].message.content


def test_streamed_chat_gives_the_same_text_and_a_usage_chunk(client):
    whole = _chat(client, QUESTIONS[3])
    chunks = list(_chat(client, QUESTIONS[3], stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion_streamed_and_not(client, local):
    plain = client.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=12)
    expected = local.session().generate("The capital of France is", max_new_tokens=12)
    assert plain.choices[0].text == expected.text and plain.choices[0].finish_reason == "length"
    streamed = client.completions.create(model="smol", prompt="The capital of France is", temperature=0,
                                         max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_ignore_eos_generates_max_tokens(client):
    ends = _chat(client, "What is 2 + 2?", max_tokens=40)
    assert ends.usage.completion_tokens < 40 and ends.choices[0].finish_reason == "stop"
    answer = _chat(client, "What is 2 + 2?", max_tokens=40, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 40 and answer.choices[0].finish_reason == "length"


def test_stop_strings_end_the_answer_before_them(client):
    full = client.completions.create(model="smol", prompt=COUNTING, temperature=0, max_tokens=20).choices[0].text
    stopped = client.completions.create(model="smol", prompt=COUNTING, temperature=0, max_tokens=20, stop=[" 16"],
                                        stream=True)
    text = "".join(c.choices[0].text for c in stopped)
    assert " 16" in full and text == full[: full.index(" 16")]


LONG = ("Summarize this paragraph in one sentence. " + "The printing press, invented around 1440, let books be "
        "copied quickly and cheaply, so that ideas spread across Europe faster than ever before. " * 6)


def test_concurrent_greedy_requests_return_what_they_return_alone(client):
    """More requests than sessions (one waits in the queue), one of them a prompt of several
    prefill chunks interleaved with the others' decode steps."""
    questions = QUESTIONS[:PARALLEL] + [LONG]
    alone = [_chat(client, q).choices[0].message.content for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(lambda q: _chat(client, q).choices[0].message.content, questions))
    assert together == alone


GROUP = 32  # the build's prefill chunk: the server reuses cached prompts in whole chunks


def test_a_conversation_that_comes_back_reuses_its_cached_prefix(client):
    first = [{"role": "user", "content": LONG}]
    answer = client.chat.completions.create(model="smol", messages=first, temperature=0, max_tokens=16)
    second = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "And in three words?"}]
    again = client.chat.completions.create(model="smol", messages=second, temperature=0, max_tokens=16)
    assert again.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens // GROUP * GROUP > 0


def test_an_answer_does_not_depend_on_what_the_cache_held(client):
    """The same question asked again finds its whole prompt cached; it must still get the answer it
    got first (with int8 activations a prefill call and a decode step round differently)."""
    # prompts of 32 + 9..31 tokens: alone, their last chunk is a prefill call (more rows than a
    # verify call); cached, only their last token would run, as a decode step
    questions = ["Write a short poem about the moon, with three verses of four lines, and give it a title that fits "
                 "it well.", "Describe a mountain in one paragraph for a child who has never seen it, using simple "
                 "words and short sentences.", "Tell me a very short story about rain in which something surprising "
                 "happens at the end, please."]
    for question in questions:  # asked twice in a row: the second time its whole prompt is cached
        first = _chat(client, question, max_tokens=48)
        assert 8 < first.usage.prompt_tokens % GROUP
        again = _chat(client, question, max_tokens=48)
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        assert again.choices[0].message.content == first.choices[0].message.content


SYSTEM = "You are a careful assistant for a museum. Answer in one short sentence, plainly, without lists. " * 3
ELSEWHERE = ["Write a short poem about the moon, with three verses of four lines, and give it a title that fits it "
             "well.", "Describe a mountain in one paragraph for a child who has never seen it, using simple words."]


def _conversations(client) -> tuple[list[str], list[int]]:
    """With one session: a conversation; another that takes the session; the first again, one
    turn on; another; a new question under the first's system prompt. (answers, cached tokens)"""
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": LONG}]
    requests = [first, [{"role": "user", "content": ELSEWHERE[0]}], None, [{"role": "user", "content": ELSEWHERE[1]}],
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]]
    answers, cached = [], []
    for messages in requests:
        if messages is None:  # the first conversation's next turn
            messages = first + [{"role": "assistant", "content": answers[0]},
                                {"role": "user", "content": "And in three words?"}]
        r = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=16)
        answers.append(r.choices[0].message.content)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    return answers, cached


def test_conversations_that_come_back_after_their_session_moved_on_start_from_the_prefix_store(smollm2_int8):
    """--cache-ram keeps finished conversations' caches apart from the sessions: with one
    session, a conversation that comes back after another request, and a request under the same
    system prompt, reuse its cache; the answers are those of a server without the store."""
    runs = {}
    for flags in (["--cache-ram", "0"], []):
        proc, base = _serve(smollm2_int8, "--parallel", "1", *flags)
        try:
            runs[bool(flags)] = _conversations(openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0))
            metrics = httpx.get(f"{base}/metrics").text
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    (plain, plain_cached), (stored, stored_cached) = runs[True], runs[False]
    assert stored == plain
    assert plain_cached[2] == plain_cached[4] == 0  # the session had answered another request since
    assert stored_cached[2] >= 3 * GROUP and stored_cached[4] >= GROUP  # the whole first turn; the system prompt
    assert re.search(r"^edgellm_prefix_store_loads_total 2.0$", metrics, re.M), metrics
    assert float(re.search(r"^edgellm_prefix_store_conversations (\S+)$", metrics, re.M).group(1)) >= 2


def test_the_prefix_store_drops_the_least_recently_used_past_its_limit_and_when_memory_runs_short(local):
    from edgellm.serve.metrics import Metrics
    from edgellm.serve.prefix_store import PrefixStore

    texts = [LONG, SYSTEM + ELSEWHERE[0], " ".join(ELSEWHERE) * 2]
    prompts = [local.prompt_ids(t)[:70] for t in texts]  # 70 tokens each: two whole chunks kept
    sessions = [local.session() for _ in prompts]
    for session, ids in zip(sessions, prompts):
        session.generate_ids(ids, max_new_tokens=1)
    one = sessions[0].engine_session.copy_cache(2 * GROUP).nbytes
    free = [1 << 40]
    metrics = Metrics()
    store = PrefixStore(5 * one // 2, GROUP, metrics, reserve_bytes=1 << 20, available=lambda: free[0])
    for session in sessions:
        store.keep(session)
    assert len(store.entries) == 2 and store.bytes == 2 * one  # the first went past the limit
    assert store.best(prompts[0] + [5], [], None) == (None, 0)
    found, reuse = store.best(prompts[1] + [5], [], None)
    assert reuse == 2 * GROUP and found.tokens == prompts[1][: 2 * GROUP]
    assert store.best(prompts[1] + [5], [], ("adapter", 1.0)) == (None, 0)  # computed without it

    # a session loaded from the store answers what a fresh one answers
    store.load(found, sessions[0], reuse)
    assert sessions[0].generate_ids(prompts[1] + [5], max_new_tokens=8).token_ids == \
        local.session().generate_ids(prompts[1] + [5], max_new_tokens=8).token_ids
    # the same conversation again is not copied twice; one that goes on from a kept one replaces it
    store.keep(sessions[0])
    assert len(store.entries) == 2
    longer = prompts[2] + prompts[0][:30]
    sessions[2].generate_ids(longer, max_new_tokens=1)
    store.keep(sessions[2])
    assert [len(e.tokens) for e in store.entries.values()] == [2 * GROUP, 3 * GROUP]
    assert store.bytes == sum(e.copy.nbytes for e in store.entries.values()) <= store.limit_bytes

    free[0] = 1 << 10  # memory runs short: every copy goes
    store.relieve()
    assert not store.entries and store.bytes == 0
    text = metrics.render().decode()
    assert re.search(r'^edgellm_prefix_store_evictions_total\{reason="limit"\} 1.0$', text, re.M), text
    assert re.search(r'^edgellm_prefix_store_evictions_total\{reason="memory"\} 2.0$', text, re.M), text


def test_json_schema_answers_always_validate(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}

    def ask(seed):
        return client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=0.8,
            seed=seed, max_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})

    with ThreadPoolExecutor(PARALLEL) as pool:
        answers = list(pool.map(ask, range(20)))
    for answer in answers:
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    assert len({a.choices[0].message.content for a in answers}) > 1  # sampled, yet always valid
    anything = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "A JSON object:"}],
                                              temperature=0, max_tokens=256, response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop"  # (an answer cut by max_tokens is cut JSON, as OpenAI's)
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_a_client_that_leaves_mid_stream_frees_its_session(server):
    before = _metrics(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": COUNTING, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        read = sum(1 for _, line in zip(range(6), lines) if line.startswith("data:"))
    assert read >= 3
    deadline = time.time() + 10
    while (after := _metrics(server))["edgellm_requests_running"] > 0:
        assert time.time() < deadline, "the session was not freed"
        time.sleep(0.05)
    assert after['edgellm_requests_abandoned_total{stage="running"}'] == \
        before.get('edgellm_requests_abandoned_total{stage="running"}', 0) + 1
    # it stopped long before its 400 tokens: the tokens read, and the few steps until the server heard
    assert after["edgellm_generated_tokens_total"] - before["edgellm_generated_tokens_total"] < 60


def test_a_queued_request_whose_client_left_never_starts(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {"prompt": COUNTING, "max_tokens": 300, "temperature": 0, "stream": True}
    before = _metrics(server)
    with httpx.Client(timeout=60, headers=headers) as http:
        streams = [http.stream("POST", f"{server}/v1/completions", json=long) for _ in range(PARALLEL)]
        lines = [s.__enter__().iter_lines() for s in streams]  # kept: a dropped iterator closes its response
        for line in lines:  # each has started: it holds a session
            next(line)
        with httpx.stream("POST", f"{server}/v1/completions", json=long, headers=headers, timeout=60):
            deadline = time.time() + 10
            while _metrics(server)["edgellm_requests_queued"] < 1:
                assert time.time() < deadline
                time.sleep(0.02)
        for s in streams:
            s.__exit__(None, None, None)
    deadline = time.time() + 10
    while (after := _metrics(server))["edgellm_requests_running"] > 0 or after["edgellm_requests_queued"] > 0:
        assert time.time() < deadline, "requests still held"
        time.sleep(0.05)
    assert after['edgellm_requests_abandoned_total{stage="queued"}'] == \
        before.get('edgellm_requests_abandoned_total{stage="queued"}', 0) + 1
    started = after['edgellm_requests_abandoned_total{stage="running"}'] - \
        before.get('edgellm_requests_abandoned_total{stage="running"}', 0)
    assert started == PARALLEL


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "gpt-4"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi " * 600}]}, 400, "context"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "log probabilities are not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tool calls"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream: "),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "image_url"),
    ({"messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}}},
     400, "cannot be enforced"),
    ({"messages": [{"role": "user", "content": "x" * 70000}]}, 413, "limit"),
])
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(server, client, body, status, needle):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}/v1/chat/completions", content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"]
    assert _chat(client, "Hi!", max_tokens=4).choices[0].message.content


def test_a_speculating_server_answers_as_the_plain_one(smollm2_int8, client):
    """--lookup: each session's pending token and drafts go through the batched step as several
    rows of one session beside other sessions' rows; greedy answers stay the plain ones."""
    proc, base = _serve(smollm2_int8, "--parallel", "3", "--lookup", "3")
    try:
        speculating = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        copy = "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog near the river bank."
        questions = [copy, QUESTIONS[1], LONG]
        with ThreadPoolExecutor(len(questions)) as pool:
            got = list(pool.map(lambda q: _chat(speculating, q, max_tokens=64).choices[0].message.content, questions))
        assert got == [_chat(client, q, max_tokens=64).choices[0].message.content for q in questions]
        metrics = httpx.get(f"{base}/metrics").text
        accepted = float(re.search(r"^edgellm_speculative_accepted_tokens_total (\S+)$", metrics, re.M).group(1))
        assert accepted > 0  # the copied sentence was drafted from the prompt
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_unknown_routes_and_methods_are_json_errors(server):
    r = httpx.get(f"{server}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


@pytest.mark.parametrize("flags, needle", [([], "not an edgellm output directory"),
                                           (["--cache-ram", "-1"], "--cache-ram -1: give 0 (no store) or more MiB")])
def test_serve_refuses_what_is_not_a_build_and_bad_flags(tmp_path, flags, needle):
    result = subprocess.run([sys.executable, "-m", "edgellm.cli", "serve", str(tmp_path), *flags], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
