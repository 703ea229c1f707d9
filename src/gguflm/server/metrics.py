"""``GET /metrics``: the scheduler's counters in the Prometheus text exposition format
(version 0.0.4), with the names llama-server and vLLM use where they have one, under the
``gguflm:`` prefix. See docs/server.md for the list."""

from __future__ import annotations

from gguflm.engine.metrics import Histogram
from gguflm.engine.scheduler import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Text:
    def __init__(self, model: str):
        self.lines: list[str] = []
        self.labels = f'model_name="{_escape(model)}"'

    def metric(self, name: str, kind: str, help_: str, value: float | None = None, **labels: str) -> None:
        self.lines += [f"# HELP gguflm:{name} {help_}", f"# TYPE gguflm:{name} {kind}"]
        if value is not None:
            self.sample(name, value, **labels)

    def sample(self, name: str, value: float, **labels: str) -> None:
        extra = "".join(f',{k}="{_escape(v)}"' for k, v in labels.items())
        self.lines.append(f"gguflm:{name}{{{self.labels}{extra}}} {_num(value)}")

    def histogram(self, name: str, help_: str, h: Histogram) -> None:
        self.metric(name, "histogram", help_)
        for bound, count in h.cumulative():
            self.sample(f"{name}_bucket", count, le=_num(bound))
        self.sample(f"{name}_sum", float(h.total))
        self.sample(f"{name}_count", h.n)


def render(scheduler: Scheduler, model: str) -> str:
    """The Prometheus text of ``scheduler``'s state and counters (``model``: the model label)."""
    s = scheduler.stats()
    kv = scheduler.kv_stats()
    m = scheduler.metrics.snapshot()
    t = _Text(model)
    t.metric("num_requests_waiting", "gauge", "Requests waiting for a slot.", s["requests_waiting"])
    t.metric("num_requests_running", "gauge", "Requests holding a slot (prefilling or decoding).", kv["running"])
    t.metric("num_slots", "gauge", "Sequences the server decodes together at most (--parallel).", s["slots_total"])
    t.metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", m["prompt_tokens"])
    t.metric("prompt_tokens_cached_total", "counter",
             "Prompt tokens whose keys/values came from the prefix cache (not computed).", m["cached_tokens"])
    t.metric("generation_tokens_total", "counter", "Tokens generated.", m["generation_tokens"])
    t.metric("generation_tokens_per_second", "gauge",
             "Tokens generated per second over the last 10 seconds.", m["generation_tokens_per_second"])
    t.metric("request_success_total", "counter", "Requests finished, by finish reason (error: failed).")
    for reason in sorted(set(m["finished"]) | {"stop", "length"}):
        t.sample("request_success_total", m["finished"].get(reason, 0), finished_reason=reason)
    t.metric("prefix_cache_queries_total", "counter", "Admitted requests that looked up the prefix cache.",
             m["prefix_queries"])
    t.metric("prefix_cache_hits_total", "counter", "Admitted requests that found at least one cached KV block.",
             m["prefix_hits"])
    t.metric("num_preemptions_total", "counter",
             "Running requests preempted (KV blocks given back, recomputed later) because the KV cache's "
             "pool ran out of blocks.", m["preemptions"])
    t.metric("kv_cache_blocks_total", "gauge", "KV cache blocks in the pool.", kv["blocks_total"])
    t.metric("kv_cache_blocks_used", "gauge", "KV cache blocks held by running requests.", kv["blocks_used"])
    t.metric("kv_cache_blocks_cached", "gauge",
             "KV cache blocks held by nobody that keep a published prefix (evicted first when needed).",
             kv["blocks_cached"])
    t.metric("kv_cache_block_size", "gauge", "Token positions per KV cache block.", kv["block_size"])
    t.metric("kv_cache_usage_ratio", "gauge", "Share of the KV cache blocks held by running requests.",
             kv["blocks_used"] / kv["blocks_total"] if kv["blocks_total"] else 0.0)
    t.histogram("time_to_first_token_seconds", "Submission to the first generated token.", m["ttft"])
    t.histogram("inter_token_latency_seconds", "Between two tokens of one request.", m["itl"])
    t.histogram("request_queue_time_seconds", "Submission to admission into a slot.", m["queue_time"])
    return "\n".join(t.lines) + "\n"
