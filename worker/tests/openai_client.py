"""Drives `llmops-worker serve` with the official `openai` client, as users' code would.

Run by worker/tests/serve.rs against a server it started:
    python openai_client.py SCENARIO BASE_URL [extra arguments]
Each scenario asserts and exits non-zero on the first failure, printing what differed.
"""

import concurrent.futures
import json
import pathlib
import re
import sys
import urllib.error
import urllib.request

import openai

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def client(base, key="none", retries=0):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=retries, timeout=300)


def raw(base, path, body=None, headers=None):
    """A plain HTTP call: status and parsed JSON (or text) body."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    if headers is None:
        headers = {} if data is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def expect_error(kind, code, call, param=None):
    try:
        call()
    except kind as e:
        body = e.body if isinstance(e.body, dict) else {}
        assert body.get("code") == code, f"expected code {code}, got {e.body!r}"
        if param is not None:
            assert body.get("param") == param, f"expected param {param}, got {e.body!r}"
        assert body.get("message"), f"error without a message: {e.body!r}"
        return e
    raise AssertionError(f"expected {kind.__name__} ({code})")


def chat(c, messages=QUESTION, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 40)
    return c.chat.completions.create(model=kw.pop("model", MODEL), messages=messages, **kw)


def scenario_api(base, traffic_dir):
    c = client(base)

    # Models: the base model under its served name.
    ids = [m.id for m in c.models.list().data]
    assert ids == [MODEL], ids

    # Chat, whole and streamed: under greedy decoding the chunks add up to the same text.
    whole = chat(c)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length"), whole
    u = whole.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0, u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    chunks = list(chat(c, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text, (streamed, text)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason], finishes
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == u.completion_tokens, chunks[-1]
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

    # Completions, whole and streamed; the token limit gives finish_reason "length".
    prompt = "The three primary colours are"
    comp = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 12, comp
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True))
    assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

    # Stop sequences: the output ends before the first occurrence, which is not included.
    words = re.findall(r"[A-Za-z]{3,}", text)
    assert len(words) >= 2, text
    stop_word = words[1]
    cut = chat(c, stop=[stop_word])
    assert cut.choices[0].finish_reason == "stop", cut
    assert cut.choices[0].message.content == text[: text.index(stop_word)], (cut, text)
    cut_stream = "".join(ch.choices[0].delta.content or "" for ch in chat(c, stop=stop_word, stream=True) if ch.choices)
    assert cut_stream == cut.choices[0].message.content, (cut_stream, cut)

    # Seeded sampling: a seed reproduces its output; other seeds give other outputs.
    def sampled(seed):
        return chat(c, temperature=1.0, seed=seed, max_tokens=30).choices[0].message.content
    first = sampled(42)
    assert sampled(42) == first
    assert any(sampled(s) != first for s in (1, 2, 3)), "different seeds all gave the same text"

    # Errors map to the client's exception classes, with stable codes.
    expect_error(openai.BadRequestError, "invalid_parameter", lambda: chat(c, temperature=3), "temperature")
    expect_error(openai.BadRequestError, "invalid_parameter", lambda: chat(c, top_p=0), "top_p")
    expect_error(openai.BadRequestError, "invalid_parameter", lambda: chat(c, n=2), "n")
    expect_error(openai.BadRequestError, "invalid_parameter", lambda: chat(c, max_tokens=0), "max_tokens")
    expect_error(openai.NotFoundError, "model_not_found", lambda: chat(c, model="gpt-7"), "model")
    long = [{"role": "user", "content": "word " * 9000}]
    expect_error(openai.BadRequestError, "context_length_exceeded", lambda: chat(c, messages=long))
    e = expect_error(openai.APIStatusError, "request_too_large",
                     lambda: chat(c, messages=[{"role": "user", "content": "x" * 70000}]))
    assert e.status_code == 413, e.status_code
    status, body = raw(base, "/v1/chat/completions", b'{"model": "smollm2", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json", (status, body)
    status, body = raw(base, "/v1/chat/completions", {"model": MODEL, "messages": "hi"})
    assert status == 400 and body["error"]["code"] == "invalid_json" and body["error"]["param"] == "messages", body
    # Bounds: max_tokens must fit in the context beside the prompt; bodies are JSON.
    expect_error(openai.BadRequestError, "context_length_exceeded", lambda: chat(c, max_tokens=10**6), "max_tokens")
    status, body = raw(base, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION},
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type", (status, body)
    status, body = raw(base, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 1e300})
    assert status == 400 and body["error"]["param"] == "max_tokens", (status, body)
    # A user's text is text: "<|im_end|>" typed in a message is several tokens of text,
    # not the one control token that would close the turn.
    def prompt_tokens(content):
        return chat(c, messages=[{"role": "user", "content": content}], max_tokens=1).usage.prompt_tokens
    assert prompt_tokens("<|im_end|>") - prompt_tokens("") >= 3

    # Feedback: refused for ratings out of range and unknown ids, recorded otherwise.
    status, body = raw(base, "/v1/feedback", {"id": whole.id, "rating": 6})
    assert status == 400 and body["error"]["param"] == "rating", (status, body)
    status, body = raw(base, "/v1/feedback", {"id": "chatcmpl-unknown", "rating": 4})
    assert status == 404 and body["error"]["code"] == "unknown_completion_id", (status, body)
    status, body = raw(base, "/v1/feedback", {"id": whole.id, "rating": 2, "correction": "Red, green and blue."})
    assert status == 200 and body["recorded"] is True, (status, body)

    records = [json.loads(line) for f in sorted(pathlib.Path(traffic_dir).glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    completions = {r["id"]: r for r in records if r["type"] == "completion"}
    feedback = [r for r in records if r["type"] == "feedback"]
    assert whole.id in completions, list(completions)
    logged = completions[whole.id]
    assert logged["output"] == text and logged["messages"][-1]["content"] == QUESTION[0]["content"], logged
    assert logged["revision"] == "rev-test" and logged["model"] == MODEL, logged
    assert [(f["id"], f["rating"], f.get("correction")) for f in feedback] == [
        (whole.id, 2, "Red, green and blue.")], feedback
    assert comp.id in completions and completions[comp.id]["prompt"] == prompt

    # Metrics: requests, errors by type, tokens.
    status, metrics = raw(base, "/metrics")
    assert status == 200
    # A deployment's server labels every series with the deployment and its revision.
    errors = 'llmops_worker_request_errors_total{deployment="api-test",revision="rev-test",' \
             'endpoint="/v1/chat/completions",type="model_not_found"} 1'
    assert errors in metrics, metrics
    for needle in ("llmops_worker_generated_tokens_total", "llmops_worker_time_to_first_token_seconds_bucket",
                   "llmops_worker_inter_token_latency_seconds_bucket", "llmops_worker_queue_depth",
                   "llmops_worker_batch_size", "llmops_worker_request_duration_seconds_bucket",
                   "llmops_worker_feedback_score_total"):
        assert needle in metrics, needle


def scenario_auth(base, key):
    expect_error(openai.AuthenticationError, "invalid_api_key", lambda: client(base, "wrong").models.list())
    expect_error(openai.AuthenticationError, "invalid_api_key", lambda: chat(client(base, key + "x")))
    assert [m.id for m in client(base, key).models.list().data] == [MODEL]
    assert chat(client(base, key), max_tokens=3).usage.completion_tokens == 3
    status, _ = raw(base, "/healthz")
    assert status == 200, "probes need no key"


PROMPTS = ["Write a haiku about the sea.", "What is 12 times 7?", "Name a famous painter.",
           "Give me a synonym for happy.", "What colour is the sky?", "Say hello in French.",
           "List two planets.", "What do bees make?"]


def batch_histogram(base):
    _, metrics = raw(base, "/metrics")
    ones = float(re.search(r'llmops_worker_decode_batch_size_bucket\{le="1.0"\} (\S+)', metrics).group(1))
    count = float(re.search(r"llmops_worker_decode_batch_size_count (\S+)", metrics).group(1))
    return ones, count


def scenario_batch(base):
    c = client(base)
    ask = lambda p: chat(c, messages=[{"role": "user", "content": p}], max_tokens=24).choices[0].message.content
    alone = [ask(p) for p in PROMPTS]
    ones_before, count_before = batch_histogram(base)
    assert count_before == ones_before, "sequential requests ran alone"
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, PROMPTS))
    for p, a, t in zip(PROMPTS, alone, together):
        assert a == t, f"{p!r}: alone {a!r}, batched {t!r}"
    ones, count = batch_histogram(base)
    assert count - ones > 0, f"no decode step advanced more than one sequence ({ones} of {count} steps alone)"


def scenario_flood(base):
    c = client(base)

    def one(i):
        try:
            r = chat(c, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=16)
            return ("ok", r.choices[0].finish_reason, r.usage.completion_tokens)
        except openai.RateLimitError as e:
            assert e.body["code"] == "queue_full", e.body
            return ("busy", None, None)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    ok = [r for r in results if r[0] == "ok"]
    busy = [r for r in results if r[0] == "busy"]
    assert busy, "a flood beyond the queue got no 429"
    assert ok and all(r[1] in ("stop", "length") and r[2] > 0 for r in ok), results
    _, metrics = raw(base, "/metrics")
    assert f'type="queue_full"}} {len(busy)}' in metrics, metrics


def metric(base, name):
    _, metrics = raw(base, "/metrics")
    return float(re.search(rf"^{name} (\S+)$", metrics, re.M).group(1))


def scenario_disconnect(base):
    """With one batch slot, a streaming client that leaves must free it at once."""
    c = client(base)
    stream = c.completions.create(model=MODEL, prompt="Count from 1 to 1000: 1, 2, 3,", temperature=0,
                                  max_tokens=3000, stream=True)
    next(iter(stream))
    stream.close()
    r = c.completions.create(model=MODEL, prompt="The sky is", temperature=0, max_tokens=8)
    assert r.usage.completion_tokens == 8, r
    assert metric(base, "llmops_worker_cancelled_requests_total") == 1
    # Only the second request ran to its end.
    assert metric(base, "llmops_worker_generated_tokens_total") == 8


def scenario_adapters(base):
    c = client(base)
    ids = sorted(m.id for m in c.models.list().data)
    assert ids == sorted([MODEL, "tuned", "zero"]), ids
    text = lambda model: chat(c, model=model, max_tokens=16).choices[0].message.content
    base_text = text(MODEL)
    assert text("zero") == base_text, "an adapter with a zero update changed the output"
    assert text("tuned") != base_text, "the adapter did not change the output"
    expect_error(openai.BadRequestError, "adapter_base_mismatch", lambda: chat(c, model="foreign"), "model")
    # Base and adapter requests batched together each give exactly what they give alone.
    tuned_text = text("tuned")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(text, [MODEL, "tuned", MODEL, "tuned"]))
    assert got == [base_text, tuned_text, base_text, tuned_text], got


if __name__ == "__main__":
    name, base, *rest = sys.argv[1:]
    globals()["scenario_" + name](base, *rest)
    print(f"scenario {name}: ok")
