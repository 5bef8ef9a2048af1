-- Atomic multi-line reservation: every line fits or nothing is taken; the
-- run (if any) is checked and touched in the same step. Mirrors
-- EmbeddedStore._reserve / _evaluate (extproc/stores/embedded.py); the
-- refusal rules come from rules.lua (= extproc/rules.py), the F_* / K_* /
-- KIND_* / MODE_* / WINDOW_* names from the prelude (extproc/stores/wire.py).
--
-- KEYS[1]  prefix "xp:{tag}:" (every key below lives under its hash tag)
-- ARGV[1]  reservation id     ARGV[2] now_ms     ARGV[3] ttl_ms
-- ARGV[4]  lines JSON (wire.LINE_FIELDS arrays)
-- ARGV[5]  meta JSON (kept verbatim)    ARGV[6] estimate JSON (kept verbatim; what expiry charges)
-- ARGV[7]  refusal memory ms    ARGV[8] '1' = check only: evaluate, take nothing, record nothing
-- ARGV[9]  run JSON [key, owner, ttl_ms, max_active, memory_ms] or ''   ARGV[10] run line keys JSON
-- ARGV[11] the run's ancestry: JSON array of ancestor run keys, root first, or '' (a root run)
-- Returns {replayed 0|1, result} where result is
--   "ok;blocked;retry_ms;warned,csv;reason;active_runs;limit,spent,reserved;...;deadline_ms"
-- (deadline last: results stored by an older version, without it, still parse)
-- Numbers are exact below 2^53 (policy validation enforces it) and always
-- formatted with %d: Lua's default number format would round them.
local P = KEYS[1]
local rid, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rkey = P .. 'resv:' .. rid
local dry = ARGV[8] == '1'
local function num(k) return tonumber(redis.call('GET', k) or '0') end

if not dry then
  local prior = redis.call('HMGET', rkey, 'result', 'state', 'until')
  if prior[1] then
    -- a refused/closed record past its memory (on the callers' clock) is forgotten
    if prior[2] == 'reserved' or tonumber(prior[3]) > now then return {1, prior[1]} end
    redis.call('DEL', rkey)
  end
end

-- The run: closed, expired, or new beyond the owner's cap refuses.
local run, reason, retry, active = nil, '', -1, -1
local runkey, ownerkey, run_exists
if ARGV[9] ~= '' then
  run = cjson.decode(ARGV[9])
  runkey, ownerkey = P .. 'run:' .. run[1], P .. 'ra:' .. run[2]
  local rec = redis.call('HMGET', runkey, 'state', 'expires_at')
  run_exists = rec[1] ~= false
  if rec[1] == 'closed' then reason = 'run_closed'
  elseif rec[1] then
    if tonumber(rec[2]) <= now then reason = 'run_expired' end
  else
    local live = '(' .. fmt(now)
    active = redis.call('ZCOUNT', ownerkey, live, '+inf')
    if active >= run[4] then
      reason = 'run_limit'
      local frees = redis.call('ZRANGEBYSCORE', ownerkey, live, '+inf', 'WITHSCORES', 'LIMIT', active - run[4], 1)
      retry = tonumber(frees[2]) - now
    else
      active = -1
    end
  end
  -- a nested run: recorded with these ancestors, each of them this owner's and active
  local chain = ARGV[11] or ''
  if reason == '' and run_exists and (redis.call('HGET', runkey, 'chain') or '') ~= chain then reason = 'run_parent' end
  if (reason == '' or reason == 'run_limit') and chain ~= '' then
    for _, a in ipairs(cjson.decode(chain)) do
      local rec = redis.call('HMGET', P .. 'run:' .. a, 'owner', 'state', 'expires_at')
      local why = ''
      if not rec[2] or rec[1] ~= run[2] then why = 'run_parent'
      elseif rec[2] == 'closed' then why = 'run_closed'
      elseif tonumber(rec[3]) <= now then why = 'run_expired' end
      if why ~= '' then reason, retry, active = why, -1, -1 break end
    end
  end
end

local lines = cjson.decode(ARGV[4])
trim_rolling(P, lines, now)
local states, firsts = read_states(P, lines, now)
local deadline = earliest_deadline(lines, states, firsts, now)

local blocked, warned = nil, {}
for i, l in ipairs(lines) do
  local kind, amount, mode, st = l[F_KIND], l[F_AMOUNT], l[F_MODE], states[i]
  if mode == MODE_ADVISORY then
    if rule_over(kind, st[1], st[2], st[3], amount) then warned[#warned + 1] = tostring(i - 1) end
  elseif blocked == nil and rule_blocks(kind, mode, st[1], st[2], st[3], amount, l[F_MARGIN], l[F_HEADROOM] or 0) then
    blocked = i
  end
end

-- The exact wait until a blocked line passes (rolling windows), a hint for
-- concurrency, -1 when waiting alone cannot help.
local function retry_after(i)
  local l, st = lines[i], states[i]
  if l[F_KIND] == KIND_CONCURRENCY then
    if l[F_AMOUNT] <= st[1] then return 1000 end
    return -1
  end
  if l[F_KIND] ~= KIND_COUNTER or l[F_WINDOW] ~= WINDOW_ROLLING then return -1 end
  local need = rule_need(l[F_MODE], st[1], st[2], st[3], l[F_AMOUNT], l[F_MARGIN], l[F_HEADROOM] or 0)
  if need > st[2] then return -1 end
  local freed = 0
  local evs = redis.call('ZRANGE', P .. K_EVENTS .. l[F_KEY], 0, -1, 'WITHSCORES')
  for j = 1, #evs, 2 do
    freed = freed + event_amount(evs[j])
    if freed >= need then
      local r = tonumber(evs[j + 1]) + l[F_WINDOW_MS] - now
      if r < 1 then r = 1 end
      return r
    end
  end
  return -1
end

if reason ~= '' then blocked = nil
elseif blocked then retry = retry_after(blocked) end
local ok = reason == '' and blocked == nil

local function encode()
  local parts = {ok and '1' or '0', blocked and tostring(blocked - 1) or '-1', fmt(retry), table.concat(warned, ','), reason, fmt(active)}
  for _, st in ipairs(states) do parts[#parts + 1] = fmt(st[1]) .. ',' .. fmt(st[2]) .. ',' .. fmt(st[3]) end
  parts[#parts + 1] = deadline and fmt(deadline) or '-1'
  return table.concat(parts, ';')
end

if dry then return {0, encode()} end

-- Any attempt on a valid run touches it: created on first sight, expiry pushed
-- to now + ttl, the lowest client-requested limit of each run line kept.
if run and reason == '' then
  local exp = now + run[3]
  if not run_exists then
    redis.call('HSET', runkey, 'state', 'active', 'owner', run[2], 'created_at', fmt(now))
    redis.call('ZREMRANGEBYSCORE', ownerkey, '-inf', fmt(now))  -- forget the owner's expired runs
  end
  redis.call('HSET', runkey, 'seen_at', fmt(now), 'expires_at', fmt(exp), 'lines', ARGV[10])
  redis.call('ZADD', ownerkey, fmt(exp), run[1])
  redis.call('ZADD', P .. 'rp', fmt(exp + run[5]), run[1])
  if (ARGV[11] or '') ~= '' then  -- recorded once; activity anywhere in the tree keeps its ancestors alive
    if not run_exists then redis.call('HSET', runkey, 'chain', ARGV[11]) end
    for _, a in ipairs(cjson.decode(ARGV[11])) do  -- (ZADD GT by hand: Redis before 6.2 lacks it)
      redis.call('HSET', P .. 'run:' .. a, 'seen_at', fmt(now), 'expires_at', fmt(exp))
      if tonumber(redis.call('ZSCORE', ownerkey, a) or '0') < exp then redis.call('ZADD', ownerkey, fmt(exp), a) end
      local purge = exp + run[5]
      if tonumber(redis.call('ZSCORE', P .. 'rp', a) or '0') < purge then redis.call('ZADD', P .. 'rp', fmt(purge), a) end
    end
  end
  for _, l in ipairs(lines) do
    if l[F_RUN] == 1 and l[F_LOWER] >= 0 then
      local lk = P .. K_LOWERED .. l[F_KEY]
      local cur = redis.call('GET', lk)
      if not cur or l[F_LOWER] < tonumber(cur) then redis.call('SET', lk, fmt(l[F_LOWER])) end
    end
  end
end

if not ok then
  local result = encode()
  redis.call('HSET', rkey, 'state', 'refused', 'result', result, 'until', fmt(now + tonumber(ARGV[7])))
  redis.call('PEXPIRE', rkey, ARGV[7])
  return {0, result}
end

for i, l in ipairs(lines) do
  if l[F_KIND] == KIND_DURATION then
    redis.call('SET', P .. K_FIRST .. l[F_KEY], fmt(now), 'NX')
  else
    redis.call('INCRBY', P .. K_RESERVED .. l[F_KEY], fmt(l[F_AMOUNT]))
    states[i][3] = states[i][3] + l[F_AMOUNT]
  end
end
local result = encode()
redis.call('HSET', rkey, 'state', 'reserved', 'result', result, 'lines', ARGV[4], 'meta', ARGV[5],
  'estimate', ARGV[6], 'created_at', fmt(now), 'run', ARGV[9])
redis.call('ZADD', P .. 'exp', fmt(now + ttl), rid)
return {0, result}
