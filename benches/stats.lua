-- wrk script: print one machine-readable line with exact statistics.
-- Only done() is defined, so wrk keeps its fast static-request path.
-- Latencies are wrk's own (microsecond resolution); errors.status counts
-- responses with a status >= 400 (wrk's "Non-2xx or 3xx responses").
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "FMBENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d " ..
    "p50=%.1f p90=%.1f p99=%.1f p999=%.1f max=%.1f mean=%.2f\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
