-- create.lua: store a new job, due at once in the schedule; or return the job its idempotency key made.
--
-- KEYS[1]  job hash              <prefix>:job:<id>
-- KEYS[2]  job events stream     <prefix>:job:<id>:events
-- KEYS[3]  schedule zset         <prefix>:schedule
-- KEYS[4]  jobs index zset       <prefix>:jobs
-- KEYS[5]  status set            <prefix>:status:queued
-- KEYS[6]  idempotency key       <prefix>:idem:<key>, or '' when the job has none
-- KEYS[7]  batch index zset      <prefix>:batch:<batch id>, or ''
-- KEYS[8]  tenant index zset     <prefix>:tenant:<tenant>:jobs, or ''
-- ARGV[1]  job id
-- ARGV[2]  now (unix seconds)
-- ARGV[3]  when the dispatcher should look again if the first message is lost (unix seconds)
-- ARGV[4]  the hash's fields, a JSON object of strings
-- Returns {1, id} when created, {0, existing id} when the idempotency key was already used.
if KEYS[6] ~= '' then
  local existing = redis.call('GET', KEYS[6])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[6], ARGV[1])
end
local flat = {}
for field, value in pairs(cjson.decode(ARGV[4])) do
  flat[#flat + 1] = field
  flat[#flat + 1] = value
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
if KEYS[7] ~= '' then redis.call('ZADD', KEYS[7], ARGV[2], ARGV[1]) end
if KEYS[8] ~= '' then redis.call('ZADD', KEYS[8], ARGV[2], ARGV[1]) end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 500, '*', 'status', 'queued', 'from', '', 'at', ARGV[2], 'event', 'created')
return {1, ARGV[1]}
