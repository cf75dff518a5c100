-- confirm.lua: rewrite fields the job already has, unchanged, so that a WAIT sent next on the same
-- connection covers them: WAIT counts the writes of its own connection, and a retry of a write
-- that already happened (a refused move, say) writes nothing of its own. Used for the
-- money-critical fields (the submit claim, the fal request id) before the pipeline goes on.
--
-- KEYS[1]  job hash              <prefix>:job:<id>
-- ARGV[1.] field names to rewrite
-- Returns how many of them the job has (each rewritten with its own value); 0 writes nothing.
local rewritten = 0
for _, name in ipairs(ARGV) do
  local value = redis.call('HGET', KEYS[1], name)
  if value then
    redis.call('HSET', KEYS[1], name, value)
    rewritten = rewritten + 1
  end
end
return rewritten
