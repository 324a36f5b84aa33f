-- wrk script: every request signs up a new user (run id, thread number, counter), and the
-- run ends with one JSON line of figures for loadtest.bench to read.
local threads = {}
local counter = 0
local run = os.getenv("BENCH_RUN") or tostring(os.time())

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_number", #threads)
end

function init(args)
  prefix = string.format("wrk_%s_%d_", run, thread_number)
end

function request()
  counter = counter + 1
  local name = prefix .. counter
  local body = '{"username":"' .. name .. '","email":"' .. name .. '@example.com"}'
  return wrk.format("POST", "/signup", {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"non_2xx": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
