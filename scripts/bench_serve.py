"""The measurements of scripts/bench-serve: a `trainer serve` started here and driven by the openai client, against
transformers' greedy generate() in this process, both with the same model and threads; medians of alternating rounds."""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", required=True)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
parser.add_argument("--streams", type=int, default=16, help="concurrent requests of the throughput measurement")
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()
REPO = Path(__file__).resolve().parent.parent
PROMPT = "The history of the printing press begins"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_decode_rate(api) -> float:
    """Decode tokens/s of one streamed request: tokens after the first over the time after the first."""
    stream = api.completions.create(model="bench", prompt=PROMPT, max_tokens=args.tokens, temperature=0, stream=True,
                                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    first = last = None
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
    return (usage.completion_tokens - 1) / (last - first)


def serve_throughput(api, streams: int) -> float:
    """Generated tokens/s of `streams` concurrent requests, from the first sent to the last answered."""
    def one(i):
        out = api.completions.create(model="bench", prompt=f"{PROMPT} ({i})", max_tokens=args.tokens, temperature=0,
                                     extra_body={"ignore_eos": True})
        return out.usage.completion_tokens
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(one, range(streams)))
    return tokens / (time.perf_counter() - started)


def transformers_decode_rate(model, ids) -> float:
    """Decode tokens/s of generate(): the time of `tokens` new tokens less that of one (the prefill)."""
    def timed(new):
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - started
    return (args.tokens - 1) / (timed(args.tokens) - timed(1))


torch.set_num_threads(args.threads)
tokenizer = AutoTokenizer.from_pretrained(args.model)
reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
ids = tokenizer(PROMPT, return_tensors="pt").input_ids
port = free_port()
server = subprocess.Popen([str(REPO / "target" / "release" / "trainer"), "serve", "--model", args.model,
                           "--served-model-name", "bench", "--port", str(port), "--threads", str(args.threads),
                           "--max-batch", str(args.streams), "--max-model-len", "512"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.2)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    serve_decode_rate(api)  # warm-up
    ours, theirs, one, many = [], [], [], []
    for _ in range(args.rounds):
        ours.append(serve_decode_rate(api))
        theirs.append(transformers_decode_rate(reference, ids))
        one.append(serve_throughput(api, 1))
        many.append(serve_throughput(api, args.streams))
finally:
    server.terminate()
    server.wait()
o, t, s1, sn = (statistics.median(v) for v in (ours, theirs, one, many))
print(f"{Path(args.model).name}, {args.tokens} new tokens, {args.threads} thread(s), median of {args.rounds} rounds "
      f"({os.cpu_count()} CPUs)")
print(f"single stream decode: trainer serve {o:.1f} tokens/s, transformers generate {t:.1f} tokens/s, "
      f"ratio {o / t:.2f} (target >= 1.0)")
print(f"throughput: {args.streams} concurrent streams {sn:.1f} tokens/s, 1 stream {s1:.1f} tokens/s, "
      f"ratio {sn / s1:.2f} (target >= 4)")
