-- wrk -s bench/wrk-report.lua: after wrk's own report, one line of JSON with the latency
-- percentiles (ms) and the error counts, for scripts. A step load with wrk is one run per
-- step, e.g.
--   for c in 4 8 12 16 20; do wrk -t1 -c$c -d10s --latency -s bench/wrk-report.lua URL | tail -1; done
-- ("status" counts responses with a status above 399, as wrk's "Non-2xx or 3xx" line does).

done = function(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local parts = {
    string.format('"requests": %d', summary.requests),
    string.format('"duration_s": %.3f', seconds),
    string.format('"rps": %.1f', seconds > 0 and summary.requests / seconds or 0),
  }
  for _, q in ipairs({50, 90, 99, 99.9}) do
    parts[#parts + 1] = string.format('"p%s_ms": %.3f', tostring(q), latency:percentile(q) / 1000)
  end
  parts[#parts + 1] = string.format('"max_ms": %.3f', latency.max / 1000)
  local e = summary.errors
  parts[#parts + 1] = string.format(
    '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}',
    e.connect, e.read, e.write, e.timeout, e.status)
  io.write("{" .. table.concat(parts, ", ") .. "}\n")
end
