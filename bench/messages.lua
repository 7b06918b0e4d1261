-- wrk script for bench/run: POST one Messages request, over and over, on keep-alive connections.
--
--   wrk ... http://127.0.0.1:PORT/v1/messages <key> <stream: 0|1>
--
-- The request is built once in init() (no per-request Lua), so wrk stays as cheap as it can be.
-- done() prints one JSON line, prefixed with BENCH_RESULT, that bench/run parses.

function init(args)
   local key = args[1] or "none"
   local stream = args[2] == "1"
   wrk.method = "POST"
   wrk.headers["content-type"] = "application/json"
   wrk.headers["anthropic-version"] = "2023-06-01"
   wrk.headers["x-api-key"] = key
   if stream then
      -- The fake upstream (nginx) answers with the recorded SSE stream when it sees this header.
      wrk.headers["x-bench-stream"] = "1"
      wrk.body = '{"model":"claude-sonnet-4-6","max_tokens":100,"stream":true,'
         .. '"messages":[{"role":"user","content":"hi"}]}'
   else
      wrk.body = '{"model":"claude-sonnet-4-6","max_tokens":100,'
         .. '"messages":[{"role":"user","content":"hi"}]}'
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
