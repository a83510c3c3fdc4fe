-- The script of every wrk run of the benchmark suite (bench/proxy.py, `wrk -s`).
--
-- Arguments after the URL (`-- METHOD BODY_BYTES`) set the request: e.g. `-- POST 1048576`
-- sends a 1 MiB body with each request. When the run ends, one line gives what wrk's own
-- report lacks: the 99.9th latency percentile (wrk prints 50/75/90/99 only) and the exact
-- counts of completed requests and bytes read. Neither hook runs per request, so the
-- script costs wrk nothing during the run.

function init(args)
   if args[1] and args[1] ~= "" then
      wrk.method = args[1]
   end
   local size = tonumber(args[2] or "0") or 0
   if size > 0 then
      -- wrk.format adds the Content-Length header for a body.
      wrk.body = string.rep("z", size)
      wrk.headers["Content-Type"] = "application/octet-stream"
   end
end

function done(summary, latency, requests)
   io.write(string.format(
      "zeitwork-bench: p99.9 %d us; requests %d; bytes %d\n",
      latency:percentile(99.9), summary.requests, summary.bytes
   ))
end
