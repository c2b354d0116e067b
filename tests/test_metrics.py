"""Observability end to end: a real Prometheus scrapes a real 2-rank training; every dashboard query returns data for both ranks, the exposition passes promtool, the endpoint holds up under concurrent scrapes, and `trainer report` draws a real run."""
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, binary, run, write_eval_tasks

TINY = REPO / "configs" / "tiny.toml"
DASHBOARD = REPO / "configs" / "grafana" / "dashboard.json"
RUN_ID = "observed-run"
RATE_INTERVAL = "10s"  # $__rate_interval for a 1 s scrape interval (Grafana: >= 4 scrapes)
STEPS = 250  # ~0.1-0.2 s each: the run outlasts the scrape load and the wait for data by far


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(path).exists(), f"{name} is missing: run scripts/test (it installs Debian's prometheus package)"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the two ranks' metrics ports)."""
    for _ in range(100):
        base = free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports on 127.0.0.1")


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200, f"{url}: HTTP {response.status}"
        return response.read()


def substitute(expr: str, rank: str = ".*") -> str:
    """Grafana's variables in a panel query, as Grafana would expand them for this run."""
    values = {"run_id": RUN_ID, "rank": rank, "__rate_interval": RATE_INTERVAL}
    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)
    assert "$" not in out, f"unexpanded variable in {out}"
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows included, but the serving panels (`trainer serve`'s
    metrics, which a training run has not; tests/test_serve.py checks them against a server)."""
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in walk(dashboard["panels"]) for t in p.get("targets", [])
            if "trainer_serve_" not in t["expr"]]


@dataclass
class Observed:
    """What the module's single observed run saw (the tests below assert on it)."""
    run_dir: Path
    prometheus: str
    query_time: float = 0.0
    expositions: dict = field(default_factory=dict)
    scrape_ok: int = 0
    scrape_errors: list = field(default_factory=list)
    running_during_load: tuple = (False, False)
    train_result: subprocess.CompletedProcess | None = None

    def query(self, expr: str) -> list[dict]:
        params = urllib.parse.urlencode({"query": expr, "time": f"{self.query_time:.3f}"})
        body = json.loads(http_get(f"{self.prometheus}/api/v1/query?{params}"))
        assert body["status"] == "success", body
        return body["data"]["result"]


def scrape_load(ports, threads=4, requests=200):
    """`threads` threads x `requests` GETs of /metrics, alternating over the ranks: (successes, errors)."""
    ok, errors, lock = [0], [], threading.Lock()

    def worker(index):
        for i in range(requests):
            port = ports[(index + i) % len(ports)]
            try:
                text = http_get(f"http://127.0.0.1:{port}/metrics").decode()
                assert "trainer_steps_total{" in text, text[:200]
                with lock:
                    ok[0] += 1
            except Exception as error:  # every failure is reported by the test
                with lock:
                    errors.append(f"port {port}: {error!r}")

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    return ok[0], errors


@pytest.fixture(scope="module")
def observed(fortunes_data, tmp_path_factory):
    """Prometheus (1 s scrapes) watching a 2-rank training through `launcher run`."""
    prometheus, work = tool("prometheus"), tmp_path_factory.mktemp("observed")
    base, prom_port = free_port_pair(), free_port()
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: trainer\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{base}', '127.0.0.1:{base + 1}']\n"
    )
    prom_log = open(work / "prometheus.log", "w")
    prom = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=prom_log, stderr=subprocess.STDOUT)
    state = Observed(run_dir=work / "run", prometheus=f"http://127.0.0.1:{prom_port}")
    trainer = None
    try:
        deadline = time.time() + 60
        while True:
            try:
                http_get(f"{state.prometheus}/-/ready", timeout=2)
                break
            except Exception:
                assert prom.poll() is None and time.time() < deadline, (work / "prometheus.log").read_text()
                time.sleep(0.3)

        args = [binary("launcher"), "run", "--nproc", 2, "--", "train", "--config", TINY]
        for item in [f"data.path={fortunes_data}", f"train.run_dir={state.run_dir}", "train.threads=1",
                     f"train.steps={STEPS}", "train.seq_len=64", "train.global_batch=4", "train.micro_batch=2",
                     "train.eval_every=10", "train.eval_sequences=4", "train.sample_tokens=0", "train.log_every=10",
                     "optim.warmup_steps=10", "metrics.enabled=true", f"metrics.port={base}",
                     f"metrics.run_id={RUN_ID}", *write_eval_tasks(work)]:
            args += ["--set", item]
        out, err = open(work / "train.out", "w+"), open(work / "train.err", "w+")
        trainer = subprocess.Popen([str(a) for a in args], stdout=out, stderr=err, text=True)

        def logs():
            return (work / "train.err").read_text()[-4000:]

        # Wait until both ranks have been scraped for a while, past an evaluation.
        first_up, deadline = None, time.time() + 240
        while True:
            assert trainer.poll() is None, f"training ended before enough scrapes were taken:\n{logs()}"
            assert time.time() < deadline, f"no data for both ranks in Prometheus:\n{logs()}"
            state.query_time = time.time()
            up = state.query('up{job="trainer"} == 1')
            if len(up) == 2 and first_up is None:
                first_up = time.time()
                # The scrape load, early in the run so that training surely outlasts it.
                running_before = trainer.poll() is None
                state.scrape_ok, state.scrape_errors = scrape_load([base, base + 1])
                state.running_during_load = (running_before, trainer.poll() is None)
            evaluated = state.query(f'trainer_validation_loss{{run_id="{RUN_ID}"}} >= 0')
            stepped = state.query(f'trainer_step{{run_id="{RUN_ID}"}} >= 20')
            # rate(...[10s]) needs two samples in the window: a few 1 s scrapes after both are up.
            if first_up and time.time() - first_up >= 6 and len(evaluated) == 2 and len(stepped) == 2:
                break
            time.sleep(0.5)

        for port in (base, base + 1):
            state.expositions[port] = http_get(f"http://127.0.0.1:{port}/metrics").decode()

        trainer.wait(timeout=600)
        out.seek(0)
        err.seek(0)
        state.train_result = subprocess.CompletedProcess(args, trainer.returncode, out.read(), err.read())
        yield state
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        prom.terminate()
        try:
            prom.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        prom_log.close()


def test_training_with_metrics_finishes(observed):
    result = observed.train_result
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[rank 0] " in result.stderr and "rank{rank=0}" in result.stderr and "rank{rank=1}" in result.stderr
    assert "metrics served at http://127.0.0.1:" in result.stderr
    lines = (observed.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS


def test_every_dashboard_query_returns_data_for_both_ranks(observed):
    queries = dashboard_queries()
    assert len(queries) >= 20, queries
    failures = []
    for title, expr in queries:
        result = observed.query(substitute(expr))
        ranks = sorted({series["metric"].get("rank") for series in result})
        values = [float(series["value"][1]) for series in result]
        if ranks != ["0", "1"]:
            failures.append(f"{title}: {expr} -> ranks {ranks}")
        elif not all(v == v and abs(v) != float("inf") for v in values):
            failures.append(f"{title}: {expr} -> non-finite values {values}")
    assert not failures, "\n".join(failures)
    # A query for one rank selects that rank only (the $rank variable works).
    loss = observed.query(substitute('trainer_loss{run_id="$run_id", rank=~"$rank"}', rank="1"))
    assert [s["metric"]["rank"] for s in loss] == ["1"]


def test_metric_values_are_plausible(observed):
    def one(expr):
        return {s["metric"]["rank"]: float(s["value"][1]) for s in observed.query(expr)}

    phases = one(f'sum by (rank) (trainer_step_phase_seconds_sum{{run_id="{RUN_ID}"}})')
    steps = one(f'trainer_step_seconds_sum{{run_id="{RUN_ID}"}}')
    for rank in ("0", "1"):
        # The phases add up to the step time (less a few timer reads per step).
        assert abs(phases[rank] - steps[rank]) <= 0.02 * steps[rank] + 0.01, (phases, steps)
    labels = {s["metric"]["rank"]: s["metric"] for s in observed.query(f'trainer_loss{{run_id="{RUN_ID}"}}')}
    assert {r: (m["tp_rank"], m["dp_rank"]) for r, m in labels.items()} == {"0": ("0", "0"), "1": ("0", "1")}
    # Every rank reduce-scatters the same buffers each step. The ranks are scraped at different
    # steps (up to a scrape interval apart), so compare bytes per step.
    reduced = one(f'trainer_collective_bytes_total{{run_id="{RUN_ID}", group="data", operation="reduce_scatter"}}'
                  f' / ignoring(group, operation) trainer_step{{run_id="{RUN_ID}"}}')
    assert reduced["0"] > 0 and abs(reduced["0"] - reduced["1"]) < 0.05 * reduced["0"], reduced
    memory = one(f'trainer_memory_used_bytes{{run_id="{RUN_ID}", memory="host_rss"}}')
    assert all(100e6 < v < 20e9 for v in memory.values()), memory
    mfu = one(f'trainer_mfu_ratio{{run_id="{RUN_ID}"}}')
    assert all(0 < v < 1 for v in mfu.values()), mfu
    assert one(f'trainer_restarts{{run_id="{RUN_ID}"}}') == {"0": 0.0, "1": 0.0}


def test_exposition_passes_promtool(observed):
    promtool = tool("promtool")
    for port, text in observed.expositions.items():
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, f"port {port}:\n{check.stdout}\n{check.stderr}"
        for name in ("trainer_loss", "trainer_step_phase_seconds_bucket", "trainer_collective_seconds_total",
                     "trainer_checkpoint_save_seconds_count", "trainer_memory_used_bytes", "trainer_restarts"):
            assert f"\n{name}{{" in text, f"{name} missing on port {port}"


def test_shipped_prometheus_config_is_valid():
    check = run(tool("promtool"), "check", "config", REPO / "configs" / "prometheus" / "prometheus.yml")
    assert "SUCCESS" in check.stdout + check.stderr


def test_endpoint_under_concurrent_scrapes(observed):
    assert observed.running_during_load == (True, True), "the scrape load must run while training runs"
    assert observed.scrape_errors == [], observed.scrape_errors[:10]
    assert observed.scrape_ok == 4 * 200
    assert observed.train_result.returncode == 0


def png_info(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the decompressed (filtered) scanlines of an 8-bit RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind}"
        chunks.setdefault(kind, []).append(body)
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][0][:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    channels = 3 if colour == 2 else 4
    assert len(raw) == height * (1 + width * channels)
    assert b"IEND" in chunks
    return width, height, raw


def test_report_png_of_a_real_run(observed, tmp_path):
    output = tmp_path / "report.png"
    result = run(binary("trainer"), "report", observed.run_dir, "--output", output)
    assert result.stdout.strip() == str(output)
    data = output.read_bytes()
    width, height, raw = png_info(data)
    assert (width, height) == (1600, 1000)
    assert len(data) > 50_000, f"{len(data)} bytes: too little drawn"
    # A flat image filters to (almost) all zeros; four panels of text, axes and lines do not.
    nonzero = sum(1 for b in raw[::7] if b) / len(raw[::7])
    assert nonzero > 0.02 and len(set(raw)) > 100, (nonzero, len(set(raw)))
    # Default output: RUN_DIR/report.png.
    run(binary("trainer"), "report", observed.run_dir)
    assert png_info((observed.run_dir / "report.png").read_bytes())[:2] == (1600, 1000)


def test_report_of_a_missing_run_is_refused_clearly(tmp_path):
    result = run(binary("trainer"), "report", tmp_path / "nothing", check=False)
    assert result.returncode == 1 and "cannot read" in result.stderr and "metrics.jsonl" in result.stderr


def test_port_in_use_is_refused_naming_port_and_key(fortunes_data, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [binary("trainer"), "train", "--config", TINY]
        for item in [f"data.path={fortunes_data}", f"train.run_dir={tmp_path}", "train.steps=1",
                     "metrics.enabled=true", f"metrics.port={port}"]:
            args += ["--set", item]
        result = run(*args, check=False)
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "metrics.port" in result.stderr, result.stderr


def test_json_logs_carry_the_rank(fortunes_data, tmp_path):
    args = [binary("trainer"), "--log-format", "json", "train", "--config", TINY]
    for item in [f"data.path={fortunes_data}", f"train.run_dir={tmp_path}", "train.steps=2", "train.threads=2",
                 "train.sample_tokens=0", "train.eval_every=0", "train.seq_len=32", "train.global_batch=2",
                 "train.micro_batch=2"]:
        args += ["--set", item]
    result = run(*args)
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines, result.stderr
    assert all(line["span"]["rank"] == 0 for line in lines), lines[:3]
