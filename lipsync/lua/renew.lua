-- renew.lua: a runner renews its lease on a job during a long transfer.
--
-- KEYS[1]  job hash              <prefix>:job:<id>
-- KEYS[2]  schedule zset         <prefix>:schedule
-- ARGV[1]  job id
-- ARGV[2]  lease owner
-- ARGV[3]  now (unix seconds)
-- ARGV[4]  lease seconds
-- Returns 1 renewed; 0 the lease is someone else's now (the caller must stop and write nothing).
if redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[2] then return 0 end
local expiry = tonumber(ARGV[3]) + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'lease_until', tostring(expiry))
redis.call('ZADD', KEYS[2], 'XX', 'GT', expiry, ARGV[1])
return 1
