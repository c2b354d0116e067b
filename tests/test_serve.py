"""`trainer serve` with the real `openai` client: completions and chat, streamed and not, equal to transformers'
greedy tokens on SmolLM2-135M-Instruct; batching does not change results; tensor-parallel serving; OpenAI-style
errors; a client that leaves frees its slot; a full queue; a bounded load test on the tiny model."""
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest
from conftest import REPO, Server, binary, run

PLAIN = ["The capital of France is", "Water boils at", "Once upon a time", "The three primary colors are"]
CHATS = ["What is the capital of France?", "Name three fruits."]


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory):
    server = Server(smollm2_dir, "--max-model-len", 1024, name="smollm2",
                    log=tmp_path_factory.mktemp("serve") / "smol.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    server = Server(tiny_checkpoint, name="tiny", log=tmp_path_factory.mktemp("serve") / "tiny.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tight(tiny_checkpoint, tmp_path_factory):
    """One request at a time, one waiting, an API key and a 2 KiB body limit."""
    server = Server(tiny_checkpoint, "--max-batch", 1, "--max-waiting", 1, "--api-key", "sekret",
                    "--max-body-bytes", 2048, name="tiny", log=tmp_path_factory.mktemp("serve") / "tight.log")
    yield server
    server.stop()


def client(server, key="none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def metric(server, name: str, labels: str = "") -> float:
    """The value of one sample of /metrics (0 when absent)."""
    text = httpx.get(f"{server.url}/metrics").text
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_for(condition, what: str, seconds: float = 10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def streamed(chunks) -> tuple[str, list, object]:
    """The text, finish reasons and usage of a stream of chunks (completions or chat)."""
    text, finishes, usage = "", [], None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += getattr(choice, "text", None) or (choice.delta.content if hasattr(choice, "delta") else "") or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return text, finishes, usage


def test_openai_client_completions_and_chat_streamed_and_not(smol, smollm2_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    api = client(smol)
    assert 503 in smol.health_seen, "/health answers 503 while the model loads"
    assert [m.id for m in api.models.list().data] == ["smollm2"]
    greedy = dict(model="smollm2", temperature=0, max_tokens=20)
    whole = api.completions.create(prompt=PLAIN[0], extra_body={"ignore_eos": True}, **greedy)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(tokenizer(PLAIN[0]).input_ids)
    assert whole.usage.completion_tokens == 20 and whole.usage.total_tokens == whole.usage.prompt_tokens + 20
    stream = api.completions.create(prompt=PLAIN[0], extra_body={"ignore_eos": True}, stream=True,
                                    stream_options={"include_usage": True}, **greedy)
    text, finishes, usage = streamed(stream)
    assert text == whole.choices[0].text and finishes == ["length"]
    assert usage.model_dump() == whole.usage.model_dump()

    messages = [{"role": "user", "content": CHATS[0]}]
    chat = api.chat.completions.create(messages=messages, model="smollm2", temperature=0, max_tokens=64)
    answer = chat.choices[0].message
    assert answer.role == "assistant" and "Paris" in answer.content, answer
    assert chat.choices[0].finish_reason == "stop"  # <|im_end|> within 64 tokens
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    # The end-of-turn token counts as generated, as in vLLM.
    assert chat.usage.completion_tokens == len(tokenizer(answer.content, add_special_tokens=False).input_ids) + 1
    stream = api.chat.completions.create(messages=messages, model="smollm2", temperature=0, max_tokens=64,
                                         stream=True, stream_options={"include_usage": True})
    text, finishes, usage = streamed(stream)
    assert (text, finishes) == (answer.content, ["stop"]) and usage.model_dump() == chat.usage.model_dump()
    # A stop string ends the text before it, streamed or not.
    cut = api.completions.create(prompt=PLAIN[0], stop=[" is"], **greedy).choices[0]
    full = api.completions.create(prompt=PLAIN[0], **greedy).choices[0].text
    if " is" in full:
        assert (cut.text, cut.finish_reason) == (full[:full.index(" is")], "stop")
    cut_stream, _, _ = streamed(api.completions.create(prompt=PLAIN[0], stop=[" is"], stream=True, **greedy))
    assert cut_stream == cut.text


def test_greedy_serving_equals_transformers(smol, smollm2_dir, tmp_path):
    """Plain and chat prompts, 32 new tokens each, sent together: transformers' greedy tokens (vLLM's
    `return_token_ids`) and their text."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    api = client(smol)
    prompts = [{"prompt": p} for p in PLAIN] + [{"messages": [{"role": "user", "content": c}]} for c in CHATS]
    options = dict(model="smollm2", temperature=0, max_tokens=32, extra_body={"return_token_ids": True})

    def ask(prompt):
        if "prompt" in prompt:
            choice = api.completions.create(prompt=prompt["prompt"], **options).choices[0]
            return choice.text, choice.prompt_token_ids, choice.token_ids
        choice = api.chat.completions.create(messages=prompt["messages"], **options).choices[0]
        return choice.message.content, choice.prompt_token_ids, choice.token_ids

    with ThreadPoolExecutor(len(prompts)) as pool:
        ours = list(pool.map(ask, prompts))
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    # One thread, as the server has: on a busy 2-core machine two threads take twice as long.
    reference = run(REPO / ".venv" / "bin" / "python", REPO / "tests" / "reference" / "hf_generate.py",
                    smollm2_dir, path, 32, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout.splitlines()
    eos = 2  # <|im_end|>: transformers keeps it at the end of a finished answer, the server stops before it
    for prompt, (text, prompt_ids, ids), theirs in zip(prompts, ours, reference):
        theirs = json.loads(theirs)
        assert ids == [t for t in theirs if t != eos], prompt
        assert text == tokenizer.decode(theirs, skip_special_tokens=True), prompt
        if "prompt" in prompt:
            assert prompt_ids == tokenizer(prompt["prompt"]).input_ids


def test_sixteen_concurrent_requests_equal_each_alone(smol):
    api = client(smol)
    requests = [(f"{PLAIN[i % 4]} {'and ' * (i % 5)}number {i}", 6 + i % 7) for i in range(16)]

    def ask(request):
        prompt, tokens = request
        return api.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=tokens,
                                      extra_body={"ignore_eos": True}).choices[0].text

    alone = [ask(r) for r in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    assert len(set(alone)) > 8, "the prompts' continuations differ"


def test_tensor_parallel_serving_equals_one_rank(smol, smollm2_dir, tmp_path):
    """SmolLM2 (9 heads) over 3 tensor-parallel ranks returns one rank's greedy tokens."""
    api = client(smol)
    requests = [(p, 24) for p in PLAIN]

    def ask(api, request):
        prompt, tokens = request
        out = api.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=tokens,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
        return out.choices[0].text, out.choices[0].token_ids

    one = [ask(api, r) for r in requests]
    tp = Server(smollm2_dir, "--max-model-len", 256, ranks=3, name="smollm2", log=tmp_path / "tp3.log")
    try:
        with ThreadPoolExecutor(4) as pool:
            three = list(pool.map(lambda r: ask(client(tp), r), requests))
        chat = client(tp).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": CHATS[0]}],
                                                  temperature=0, max_tokens=16)
        assert "Paris" in chat.choices[0].message.content
    finally:
        tp.stop()
    assert three == one


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(tiny):
    url = f"{tiny.url}/v1/completions"
    post = lambda body: httpx.post(url, json=body)  # noqa: E731
    assert "not valid JSON" in error_of(httpx.post(url, content=b"{oops"), 400)["message"]
    assert error_of(post({"model": "tiny"}), 400)["param"] == "prompt"
    assert error_of(post({"prompt": "a"}), 400)["param"] == "model"
    assert error_of(post({"model": "tiny", "prompt": "a", "max_tokens": "ten"}), 400)["param"] == "max_tokens"
    assert error_of(post({"model": "tiny", "prompt": 5}), 400)["param"] == "prompt"
    assert error_of(post({"model": "gpt-9", "prompt": "a"}), 404)["code"] == "model_not_found"
    too_long = error_of(post({"model": "tiny", "prompt": "a", "max_tokens": 100000}), 400)
    assert too_long["param"] == "max_tokens" and "context of 256 tokens" in too_long["message"]
    long_prompt = error_of(post({"model": "tiny", "prompt": list(range(250)), "max_tokens": 10}), 400)
    assert "at most 6" in long_prompt["message"]
    for field, value in [("temperature", -1), ("top_p", 0), ("top_p", 7), ("top_k", -3), ("min_p", 2),
                         ("repetition_penalty", 0), ("max_tokens", 0), ("max_tokens", -5), ("n", 4)]:
        assert error_of(post({"model": "tiny", "prompt": "a", field: value}), 400)["param"] == field, field
    assert error_of(post({"model": "tiny", "prompt": [99999]}), 400)["param"] == "prompt"
    assert error_of(httpx.post(f"{tiny.url}/v1/chat/completions", json={"model": "tiny", "messages": "hi"}),
                    400)["param"] == "messages"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert "no chat template" in error_of(httpx.post(f"{tiny.url}/v1/chat/completions", json=chat), 400)["message"]
    assert error_of(httpx.get(f"{tiny.url}/v1/nothing"), 404)["code"] == "not_found"
    ok = post({"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 4
    assert metric(tiny, "trainer_serve_requests_total", 'endpoint="/v1/completions",status="400"') >= 15


def test_api_key_body_limit_full_queue_and_a_client_that_leaves(tight):
    url = f"{tight.url}/v1/completions"
    auth = {"Authorization": "Bearer sekret"}
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
    assert error_of(httpx.post(url, json=body), 401)["code"] == "invalid_api_key"
    assert error_of(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        client(tight, "wrong").completions.create(**body)
    assert client(tight, "sekret").completions.create(**body).usage.completion_tokens <= 4
    big = {**body, "prompt": "x" * 4000}
    assert error_of(httpx.post(url, json=big, headers=auth), 413)["code"] == "body_too_large"
    assert httpx.get(f"{tight.url}/health").status_code == 200

    # A long streamed request takes the one place in the batch, a second waits, a third is refused.
    long = {"model": "tiny", "prompt": "Once", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as first, first.stream("POST", url, json=long, headers=auth) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")
        wait_for(lambda: metric(tight, "trainer_serve_requests_running") == 1, "the first request runs")
        assert metric(tight, "trainer_serve_kv_cache_tokens") > 0
        with httpx.Client(timeout=60) as second, second.stream("POST", url, json=long, headers=auth):
            wait_for(lambda: metric(tight, "trainer_serve_requests_waiting") == 1, "the second request waits")
            assert error_of(httpx.post(url, json=body, headers=auth), 429)["code"] == "queue_full"
        # Both clients leave mid-stream: their places and cached tokens are freed at once.
    wait_for(lambda: metric(tight, "trainer_serve_requests_running") == 0
             and metric(tight, "trainer_serve_kv_cache_tokens") == 0, "the slot of a client that left is freed")
    assert metric(tight, "trainer_serve_requests_waiting") == 0
    started = time.monotonic()
    assert client(tight, "sekret").completions.create(**body).choices[0].finish_reason in ("length", "stop")
    assert time.monotonic() - started < 10, "the abandoned requests were still running"


def test_load_of_200_requests_from_32_clients(tiny, tiny_checkpoint, tmp_path):
    """Every response equals `trainer generate`'s output for its prompt: none lost, failed or mixed up. Sampled with
    a seed (each request's own generator, deterministic whatever runs beside it): the briefly trained tiny model's
    greedy continuations are nearly all alike, sampled ones differ from prompt to prompt."""
    prompts = [f"Q: what is number {i}? A:" if i % 2 else f"You will meet {i} people" for i in range(20)]
    args = ["generate", "--model", tiny_checkpoint, "--json", "--threads", 1, "--seed", 7, "--max-tokens", 24,
            "--ignore-eos"]
    for p in prompts:
        args += ["--prompt", p]
    expected = [json.loads(line)["text"] for line in run(binary("trainer"), *args).stdout.splitlines()]
    assert len(set(expected)) == 20, "the prompts' continuations differ"
    api = client(tiny)
    errors = []

    def ask(i):
        try:
            stream = i % 3 == 0
            out = api.completions.create(model="tiny", prompt=prompts[i % 20], seed=7, max_tokens=24,
                                         extra_body={"ignore_eos": True}, stream=stream)
            text = streamed(out)[0] if stream else out.choices[0].text
            return i, text
        except Exception as error:  # noqa: BLE001 (collected and reported below)
            errors.append(error)
            raise

    before = metric(tiny, "trainer_serve_requests_total", 'endpoint="/v1/completions",status="200"')
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(200)))
    assert not errors
    for i, text in results:
        assert text == expected[i % 20], (i, prompts[i % 20])
    after = metric(tiny, "trainer_serve_requests_total", 'endpoint="/v1/completions",status="200"')
    assert after - before == 200
    assert metric(tiny, "trainer_serve_time_to_first_token_seconds_count") >= 200
    assert metric(tiny, "trainer_serve_completion_tokens_total") >= 200 * 24
    wait_for(lambda: metric(tiny, "trainer_serve_requests_running") == 0, "no request runs after the load")


def test_every_serving_panel_of_the_dashboard_reads_metrics_the_server_exposes_and_promtool_accepts_them(tiny):
    import shutil
    import subprocess
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    assert httpx.get(f"{tiny.url}/v1/models").status_code == 200  # requests_total has a sample from then on
    text = httpx.get(f"{tiny.url}/metrics").text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, f"{check.stdout}\n{check.stderr}"
    dashboard = json.loads((REPO / "configs" / "grafana" / "dashboard.json").read_text())
    row = [p for p in dashboard["panels"] if p["title"].startswith("Serving")]
    assert row, "the dashboard has a Serving row"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "trainer_serve_" in t["expr"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for e in exprs for name in re.findall(r"trainer_serve_\w+", e)}
    exposed = set(re.findall(r"^# TYPE (trainer_serve_\w+)", text, re.MULTILINE))
    assert len(used) >= 9 and used <= exposed, used - exposed
