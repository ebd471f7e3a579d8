"""chatterbox_* metrics reach Prometheus: a real Prometheus server scrapes Ray's metrics endpoint.

Ray's exporter prefixes application metrics with `ray_` (our `chatterbox_t3_step_seconds` is scraped as
`ray_chatterbox_t3_step_seconds`); the tests accept the name with or without that prefix.

Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`; scripts/test-deps.sh does it); skipped
without it. Ray exports application metrics every few seconds, so the test polls.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from serve_app.serving.launch.local_ray import free_ports

pytestmark = pytest.mark.timeout(600)

EXPECTED = {
    "chatterbox_requests_total",
    "chatterbox_request_duration_seconds_bucket",
    "chatterbox_time_to_first_audio_seconds_bucket",
    "chatterbox_first_audio_phase_seconds_bucket",   # the request below streams (the default)
    "chatterbox_first_audio_phase_seconds_total",    # the exact sums the bench's means read (not the _sum)
    "chatterbox_t3_step_requests_total",
    "chatterbox_t3_kv_positions_read_total",    # the engine backend's attention traffic (KV read per held)
    "chatterbox_t3_kv_positions_used_total",
    "chatterbox_s3gen_step_streams_total",
    "chatterbox_s3gen_flow_calls_total",         # the engine backend's flow calls (/ steps: calls per step)
    "chatterbox_s3gen_first_steps_total",
    "chatterbox_s3gen_stream_steps_total",       # rows in vocoder steps by the scheduler's reason
    "chatterbox_s3gen_chunks_total",             # text chunks by how T3 ended them (stop / length / incomplete)
    "chatterbox_audio_seconds_total",
    "chatterbox_t3_request_seconds_bucket",
    "chatterbox_t3_speech_tokens_total",
    "chatterbox_t3_batch_size_bucket",
    "chatterbox_t3_step_seconds_bucket",   # engine backend (deploy/cpu-tiny.yaml uses it)
    "chatterbox_s3gen_batch_seconds_bucket",
    "chatterbox_s3gen_batch_size_bucket",
    "chatterbox_s3gen_queue_depth",
    "chatterbox_t3_queue_depth",
}


def _ours(names) -> set[str]:
    """Our metric names, without the `ray_` prefix Ray's exporter adds."""
    return {n.removeprefix("ray_") for n in names if n.removeprefix("ray_").startswith("chatterbox_")}


def _metric_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return _ours(names)


def _poll(fn, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        ok, last = fn()
        if ok:
            return last
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last}")


@pytest.fixture(scope="module")
def traffic(serve_app_instance):
    with serve_app_instance.client() as http:
        r = http.post("/v1/audio/speech", json={"input": "Metrics please.", "response_format": "wav", "seed": 7})
        assert r.status_code == 200, r.text
    return serve_app_instance


def test_ray_endpoint_exports_chatterbox_metrics(traffic):
    def scrape():
        names = _metric_names(httpx.get(traffic.metrics_url, timeout=10).text)
        return EXPECTED <= names, sorted(names)

    _poll(scrape, 120, "chatterbox_* series on Ray's metrics endpoint")


@pytest.fixture(scope="module")
def prometheus(traffic):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install -y prometheus; see scripts/test-deps.sh)")
    root = Path(tempfile.mkdtemp(prefix="cbprom-"))
    (port,) = free_ports(1)
    (root / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{traffic.metrics_port}']}}]\n")
    proc = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(root / "prometheus.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        _poll(lambda: (_ready(url), None), 60, "prometheus to start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_prometheus_scrapes_chatterbox_series(prometheus):
    def query():
        r = httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10)
        names = _ours(r.json()["data"])
        return EXPECTED <= names, sorted(names)

    _poll(query, 120, "chatterbox_* series in Prometheus")
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'sum({__name__=~"(ray_)?chatterbox_t3_speech_tokens_total"})'}, timeout=10)
    result = r.json()["data"]["result"]
    assert result and float(result[0]["value"][1]) > 0
    r = httpx.get(f"{prometheus}/api/v1/query",
                  params={"query": '{__name__=~"(ray_)?chatterbox_requests_total",route="speech",status="200"}'},
                  timeout=10)
    series = r.json()["data"]["result"]
    assert series and {"deployment", "application"} <= set(series[0]["metric"])
