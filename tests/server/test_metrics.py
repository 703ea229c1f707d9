"""``GET /metrics`` of the real server, read by Prometheus' own parser (prometheus_client):
the text parses, every family has its HELP and TYPE, histograms are cumulative with +Inf
equal to their count, and the counters move by what the requests did (the usage the API
reported, one prefix-cache hit for a repeated prompt, one first-token latency each)."""

from __future__ import annotations

import httpx
import pytest

SYSTEM = ("You are a terse assistant for a hardware store. Answer in at most one sentence, never use lists, "
          "and say you do not know when you do not. Prices are in euros and include tax. ")


def scrape(server) -> dict:
    parser = pytest.importorskip("prometheus_client.parser", reason="Prometheus' text parser (prometheus_client)")
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert text.endswith("\n")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    typed: dict[str, str] = {}
    for line in text.splitlines():       # strict: every sample's family announced (HELP, TYPE) before it
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            typed[name] = kind
        elif not line.startswith("#"):
            name = line.split("{")[0]
            base = next((n for n in typed if name in (n, n + "_total", n + "_bucket", n + "_sum", n + "_count")), None)
            assert base is not None and name.startswith("gguflm:"), line
    for f in families.values():
        assert f.documentation and f.type in ("gauge", "counter", "histogram"), f
        if f.type == "histogram":
            buckets = [s for s in f.samples if s.name.endswith("_bucket")]
            counts = [s.value for s in buckets]
            assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
            (count,) = [s.value for s in f.samples if s.name.endswith("_count")]
            assert counts[-1] == count
    return families


def value(families: dict, name: str, **labels) -> float:
    f = families["gguflm:" + name]
    want = name if f.type != "counter" else name + ("_total" if not name.endswith("_total") else "")
    for s in f.samples:
        if s.name.endswith("_count") and f.type == "histogram":
            return s.value
        if f.type != "histogram" and s.name in ("gguflm:" + want, "gguflm:" + name) and all(
                s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(name)


def test_metrics_follow_the_requests(server, client) -> None:
    server.wait_idle()
    before = scrape(server)
    usage = []
    for question in ("Do you sell hammers?", "Do you sell nails?"):
        r = client.chat.completions.create(model="x", max_tokens=5, temperature=0, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
        usage.append(r.usage)
    server.wait_idle()
    after = scrape(server)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("prompt_tokens") == sum(u.prompt_tokens for u in usage)
    assert delta("generation_tokens") == sum(u.completion_tokens for u in usage)
    assert delta("prompt_tokens_cached") == usage[1].prompt_tokens_details.cached_tokens > 0
    assert delta("prefix_cache_queries") == 2 and delta("prefix_cache_hits") >= 1
    assert delta("num_preemptions") == 0    # the default pool holds every slot's whole context
    assert delta("time_to_first_token_seconds") == 2
    assert delta("inter_token_latency_seconds") >= sum(u.completion_tokens - 1 for u in usage)
    assert sum(delta("request_success", finished_reason=r) for r in ("stop", "length")) == 2
    assert value(after, "num_requests_running") == 0 and value(after, "num_requests_waiting") == 0
    total, used = value(after, "kv_cache_blocks_total"), value(after, "kv_cache_blocks_used")
    assert total > 0 and used == 0 and value(after, "kv_cache_blocks_cached") > 0
    assert value(after, "kv_cache_block_size") >= 1
    assert value(after, "generation_tokens_per_second") > 0
