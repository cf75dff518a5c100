-- move.lua: the one write of a job's state. A step's outcome (advance, wait, fail), a cancel, a
-- retry, a note: status, fields, event, the runner's lease, the schedule and the admission slot
-- change together or not at all.
--
-- KEYS[1]  job hash              <prefix>:job:<id>
-- KEYS[2]  job events stream     <prefix>:job:<id>:events
-- KEYS[3]  schedule zset         <prefix>:schedule   (jobs a Celery step will work on)
-- KEYS[4]  waiting zset          <prefix>:waiting    (jobs at fal, checked by the poller)
-- KEYS[5]  inflight set          <prefix>:inflight   (admission slots)
-- KEYS[6]  finished zset         <prefix>:finished
-- KEYS[7]  callbacks zset        <prefix>:callbacks
-- ARGV[1]  job id
-- ARGV[2]  now (unix seconds)
-- ARGV[3]  status set prefix     <prefix>:status:
-- ARGV[4]  statuses the job must be in, space-separated ('' any)
-- ARGV[5]  new status ('' unchanged)
-- ARGV[6]  lease owner ('' none): the write happens only while this runner still holds the
--          job, and gives the lease back. '?owner': written regardless (a fact that already
--          happened at fal), the lease given back if it is still ours
-- ARGV[7]  next look at the job: '' leave, '-' none, else unix seconds (in `waiting` while the
--          job is at fal, in `schedule` otherwise)
-- ARGV[8]  fields to set, a JSON object of strings ('' none)
-- ARGV[9]  fields to delete, space-separated ('' none)
-- ARGV[10] counter fields to increment by one, space-separated ('' none)
-- ARGV[11] fields that must be absent for the write to happen, space-separated ('' none)
-- ARGV[12] event for the job's stream ('' none)
-- ARGV[13] statuses at fal, space-separated
-- ARGV[14] end statuses, space-separated
-- ARGV[15] seconds the finished index keeps a job
-- ARGV[16] every status, space-separated (to read when the job entered the one it leaves)
-- ARGV[17] '<owner> <seconds>': our lease is handed to the next step's runner (it runs in place,
--          `lifecycle.Step.inline`) instead of given back, and the job read for it ('' none)
-- Returns {1, status before, entered it at, submitted at, queued at, cost estimate[, the job's
-- fields when the lease was handed on (ARGV[17])]} written
-- (the last four for the job metrics); {0, status before} refused (status or absent fields;
-- the runner's lease is given back all the same); {-1, ''} no such job; {-2, status before}
-- the lease is another runner's (nothing written).
-- The admission slot is freed when the job leaves fal, or a runner's outcome leaves a job in
-- `submitting` (its POST did not happen): taking and giving back a slot is part of the job's state.
local function member(list, value)
  for s in string.gmatch(list, '%S+') do if s == value then return true end end
  return false
end
local names = {'status', 'lease_owner', 'callback_url', 'ts:submitted', 'ts:queued', 'cost_estimate_usd'}
for s in string.gmatch(ARGV[16], '%S+') do names[#names + 1] = 'ts:' .. s end
local found = redis.call('HMGET', KEYS[1], unpack(names))
local cur = found[1]
if not cur then return {-1, ''} end
local owner = ARGV[6]
local lenient = string.sub(owner, 1, 1) == '?'
if lenient then owner = string.sub(owner, 2) end
local ours = owner ~= '' and found[2] == owner
if owner ~= '' and not lenient and not ours then return {-2, cur} end
local refused = ARGV[4] ~= '' and not member(ARGV[4], cur)
for f in string.gmatch(ARGV[11], '%S+') do
  if redis.call('HEXISTS', KEYS[1], f) == 1 then refused = true end
end
if refused then
  -- the job moved on without this runner (cancelled, say): its lease goes, nothing else changes
  if ours then redis.call('HDEL', KEYS[1], 'lease_owner', 'lease_until') end
  return {0, cur}
end
local entered = false
for i = 7, #names do
  if names[i] == 'ts:' .. cur then entered = found[i] end
end
local now = ARGV[2]
local to = cur
local set = {'updated_at', now}
if ARGV[5] ~= '' and ARGV[5] ~= cur then
  to = ARGV[5]
  -- ts:<status> is when the job entered it: a check that finds it still in_queue keeps it
  set[#set + 1] = 'status'
  set[#set + 1] = to
  set[#set + 1] = 'ts:' .. to
  set[#set + 1] = now
  redis.call('SREM', ARGV[3] .. cur, ARGV[1])
  redis.call('SADD', ARGV[3] .. to, ARGV[1])
end
if ARGV[8] ~= '' then
  for f, v in pairs(cjson.decode(ARGV[8])) do
    set[#set + 1] = f
    set[#set + 1] = v
  end
end
local ended = member(ARGV[14], to)
local hand = ARGV[17] ~= '' and ours and not ended
if hand then
  local next_owner, seconds = string.match(ARGV[17], '(%S+) (%S+)')
  for _, v in ipairs({'lease_owner', next_owner, 'lease_until', tostring(tonumber(now) + tonumber(seconds))}) do
    set[#set + 1] = v
  end
end
redis.call('HSET', KEYS[1], unpack(set))
local del = {}
for f in string.gmatch(ARGV[9], '%S+') do del[#del + 1] = f end
-- an ended job is no runner's: one still working on it finds its lease gone and stops
if (ours and not hand) or (ended and to ~= cur) then
  del[#del + 1] = 'lease_owner'
  del[#del + 1] = 'lease_until'
end
if #del > 0 then redis.call('HDEL', KEYS[1], unpack(del)) end
for f in string.gmatch(ARGV[10], '%S+') do redis.call('HINCRBY', KEYS[1], f, 1) end
local was_at_fal = member(ARGV[13], cur)
local at_fal = member(ARGV[13], to)
if ended or ARGV[7] == '-' then
  redis.call('ZREM', was_at_fal and KEYS[4] or KEYS[3], ARGV[1])
elseif ARGV[7] ~= '' then
  redis.call('ZADD', at_fal and KEYS[4] or KEYS[3], ARGV[7], ARGV[1])
  if at_fal ~= was_at_fal then redis.call('ZREM', was_at_fal and KEYS[4] or KEYS[3], ARGV[1]) end
end
if not at_fal and (was_at_fal or (cur == 'submitting' and (to ~= cur or ARGV[6] ~= ''))) then
  redis.call('SREM', KEYS[5], ARGV[1])
end
if ARGV[12] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 500, '*', 'status', to, 'from', cur, 'at', now, 'event', ARGV[12])
end
if ended and to ~= cur then
  redis.call('ZADD', KEYS[6], now, ARGV[1])
  -- old entries are trimmed by about one ending in 256 (ids are random hex): enough, and cheap
  if string.sub(ARGV[1], -2) == '00' then
    redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', tonumber(now) - tonumber(ARGV[15]))
  end
  if found[3] then redis.call('ZADD', KEYS[7], now, ARGV[1]) end
end
if hand then
  return {1, cur, entered, found[4] or false, found[5] or false, found[6] or false, redis.call('HGETALL', KEYS[1])}
end
return {1, cur, entered, found[4] or false, found[5] or false, found[6] or false}
