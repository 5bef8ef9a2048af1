-- Admin and housekeeping operations on one budget tree, each atomic.
-- Mirrors EmbeddedStore.adjust / close_run / run_state / _purge_runs.
--
-- KEYS[1] prefix "xp:{tag}:"   ARGV[1] operation, then:
--   adjust    ARGV[2] line key  ARGV[3] new limit or ''  ARGV[4] credit
--   run_state ARGV[2] run key
--   close_run ARGV[2] run key   ARGV[3] owner  ARGV[4] now_ms  ARGV[5] memory ms
--   purge     ARGV[2] now_ms    ARGV[3] max runs  ARGV[4] retry ms (a run still holding reservations)
--   trim_ledger ARGV[2] before ms  ARGV[3] max entries: drop the oldest ledger entries closed
--             before ARGV[2], up to the first one inside the retention
--   lease     (KEYS[1] is the lease key) ARGV[2] owner  ARGV[3] now_ms  ARGV[4] ttl ms: take or
--             renew; 0 while another owner holds it (times on the callers' clock)
-- run_state/close_run return {owner, state, created_at, seen_at, expires_at, chain} (or {} if unknown).
local P, op = KEYS[1], ARGV[1]
local function fmt(n) return string.format('%d', n) end

local function run_fields(runkey)
  local r = redis.call('HMGET', runkey, 'owner', 'state', 'created_at', 'seen_at', 'expires_at', 'chain')
  if not r[2] then return {} end
  return r
end

if op == 'adjust' then
  local key = ARGV[2]
  if ARGV[3] ~= '' then
    redis.call('SET', P .. K_LIMIT .. key, ARGV[3])
    redis.call('DEL', P .. K_LOWERED .. key)
  end
  if ARGV[4] ~= '0' then redis.call('INCRBY', P .. K_CREDIT .. key, ARGV[4]) end
  return 1
end

if op == 'run_state' then return run_fields(P .. 'run:' .. ARGV[2]) end

if op == 'close_run' then
  local key, owner, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
  local runkey = P .. 'run:' .. key
  if redis.call('EXISTS', runkey) == 0 then
    redis.call('HSET', runkey, 'owner', owner, 'created_at', fmt(now), 'seen_at', fmt(now),
      'expires_at', fmt(now), 'lines', '[]')
  end
  redis.call('HSET', runkey, 'state', 'closed')
  redis.call('ZREM', P .. 'ra:' .. redis.call('HGET', runkey, 'owner'), key)
  redis.call('ZADD', P .. 'rp', fmt(now + tonumber(ARGV[5])), key)
  return run_fields(runkey)
end

if op == 'purge' then
  local now = tonumber(ARGV[2])
  local due = redis.call('ZRANGEBYSCORE', P .. 'rp', '-inf', fmt(now), 'LIMIT', 0, tonumber(ARGV[3]))
  local purged = 0
  for _, key in ipairs(due) do
    local runkey = P .. 'run:' .. key
    local rec = redis.call('HMGET', runkey, 'owner', 'lines')
    local keys = cjson.decode(rec[2] or '[]')
    local busy = false
    for _, k in ipairs(keys) do
      if tonumber(redis.call('GET', P .. K_RESERVED .. k) or '0') ~= 0 then busy = true end
    end
    if busy then
      redis.call('ZADD', P .. 'rp', fmt(now + tonumber(ARGV[4])), key)
    else
      for _, k in ipairs(keys) do
        redis.call('DEL', P .. K_LIMIT .. k, P .. K_CREDIT .. k, P .. K_LOWERED .. k, P .. K_RESERVED .. k,
          P .. K_ROLLING_SUM .. k, P .. K_FIRST .. k, P .. K_SPENT .. k .. '|', P .. K_EVENTS .. k)
      end
      redis.call('DEL', runkey)
      redis.call('ZREM', P .. 'rp', key)
      if rec[1] then redis.call('ZREM', P .. 'ra:' .. rec[1], key) end
      purged = purged + 1
    end
  end
  return purged
end

if op == 'trim_ledger' then
  local key, before, max = P .. 'ledger', tonumber(ARGV[2]), tonumber(ARGV[3])
  local dropped, last, from, done = 0, nil, '-', false
  while not done and dropped < max do  -- in batches: usually the first entry is inside the retention
    local rows = redis.call('XRANGE', key, from, '+', 'COUNT', math.min(100, max - dropped))
    if #rows == 0 then break end
    for _, r in ipairs(rows) do
      local f, closed = r[2], nil
      for j = 1, #f, 2 do if f[j] == 'closed_at' then closed = tonumber(f[j + 1]) end end
      if closed and closed >= before then done = true break end
      dropped, last = dropped + 1, r[1]
    end
    if last then from = '(' .. last end
  end
  if last then
    local ms, seq = string.match(last, '^(%d+)-(%d+)$')
    redis.call('XTRIM', key, 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
  end
  return dropped
end

if op == 'lease' then
  local owner, now = ARGV[2], tonumber(ARGV[3])
  local cur = redis.call('HMGET', P, 'owner', 'until')
  if cur[1] and cur[1] ~= owner and tonumber(cur[2]) > now then return 0 end
  redis.call('HSET', P, 'owner', owner, 'until', fmt(now + tonumber(ARGV[4])))
  return 1
end

return redis.error_reply('unknown admin operation ' .. tostring(op))
