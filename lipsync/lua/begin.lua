-- begin.lua: a step starts on a job: take its lease, mark its working status, read the job. One round trip.
--
-- KEYS[1]  job hash              <prefix>:job:<id>
-- KEYS[2]  job events stream     <prefix>:job:<id>:events
-- KEYS[3]  schedule zset         <prefix>:schedule (not written: named for the reader)
-- ARGV[1]  job id
-- ARGV[2]  lease owner (a token unique to this run of the step)
-- ARGV[3]  now (unix seconds)
-- ARGV[4]  lease seconds
-- ARGV[5]  statuses the step handles, space-separated
-- ARGV[6]  the step's working status ('' none): a job in another handled status moves to it
-- ARGV[7]  status set prefix     <prefix>:status:
-- ARGV[8]  counter field to increment when the working status is entered ('' none)
-- Returns {-1} no job; {0} another live runner holds the lease; {2, status} not this step's
-- status (nothing written); {1, status before, field, value, ...} the lease is ours, with the
-- job's hash as it is now (the fields read, then those written: a field repeated later wins).
local job = redis.call('HGETALL', KEYS[1])
local found = {}
for i = 1, #job, 2 do found[job[i]] = job[i + 1] end
local status, owner = found['status'], found['lease_owner']
if not status then return {-1} end
local now = tonumber(ARGV[3])
if owner and owner ~= ARGV[2] and tonumber(found['lease_until'] or '0') > now then
  return {0}
end
local handled = false
for s in string.gmatch(ARGV[5], '%S+') do if s == status then handled = true end end
if not handled then return {2, status} end
local expiry = now + tonumber(ARGV[4])
-- The schedule's safety net is already a lease ahead (the write that handed the job on, or the
-- dispatcher's claim, put it there), and `renew` pushes it on: a live runner gets no duplicate.
local set = {'lease_owner', ARGV[2], 'lease_until', tostring(expiry)}
local enters = ARGV[6] ~= '' and status ~= ARGV[6]
if enters then
  for _, v in ipairs({'status', ARGV[6], 'ts:' .. ARGV[6], ARGV[3], 'updated_at', ARGV[3]}) do
    set[#set + 1] = v
  end
  if ARGV[8] ~= '' then
    set[#set + 1] = ARGV[8]
    set[#set + 1] = tostring(tonumber(found[ARGV[8]] or '0') + 1)
  end
end
redis.call('HSET', KEYS[1], unpack(set))
if enters then
  redis.call('SREM', ARGV[7] .. status, ARGV[1])
  redis.call('SADD', ARGV[7] .. ARGV[6], ARGV[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 500, '*',
    'status', ARGV[6], 'from', status, 'at', ARGV[3], 'event', ARGV[6])
end
for _, v in ipairs(set) do job[#job + 1] = v end
table.insert(job, 1, status)
table.insert(job, 1, 1)
return job
