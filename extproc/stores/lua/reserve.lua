-- Atomic multi-line reservation: every line fits or nothing is taken.
-- Mirrors EmbeddedStore.reserve (extproc/stores/embedded.py) exactly.
--
-- KEYS[1]  prefix "xp:{tag}:" (every key below lives under its hash tag)
-- ARGV[1]  reservation id     ARGV[2] now_ms     ARGV[3] ttl_ms
-- ARGV[4]  lines JSON  [[key, kind, dimension, limit, amount, mode, window, period, window_ms, margin, period_ttl_s], ...]
-- ARGV[5]  meta JSON (kept verbatim)    ARGV[6] estimate JSON (kept verbatim; what expiry charges)
-- ARGV[7]  refusal memory ms    ARGV[8] '1' = dry run: report states, take nothing, record nothing
-- Returns {replayed 0|1, result} where result is
--   "ok;blocked;retry_ms;warned,csv;limit,spent,reserved;limit,spent,reserved;..."
-- Numbers are exact below 2^53 (policy validation enforces it) and always
-- formatted with %d: Lua's default number format would round them.
local P = KEYS[1]
local rid, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rkey = P .. 'resv:' .. rid
local dry = ARGV[8] == '1'
if not dry then
  local prior = redis.call('HGET', rkey, 'result')
  if prior then return {1, prior} end
end

local lines = cjson.decode(ARGV[4])
local function num(k) return tonumber(redis.call('GET', k) or '0') end
local function fmt(n) return string.format('%d', n) end

local function effective_limit(key, limit)
  local override = redis.call('GET', P .. 'lim:' .. key)
  if override then limit = tonumber(override) end
  return limit + num(P .. 'cr:' .. key)
end

local function rolling_spent(key, window_ms)
  local ek, sk = P .. 'e:' .. key, P .. 'es:' .. key
  local cutoff = now - window_ms
  local gone = redis.call('ZRANGEBYSCORE', ek, '-inf', cutoff)
  if #gone > 0 then
    local freed = 0
    for _, m in ipairs(gone) do freed = freed + tonumber(string.match(m, ':(%-?%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', ek, '-inf', cutoff)
    redis.call('DECRBY', sk, fmt(freed))
  end
  return num(sk)
end

local states, blocked, warned = {}, nil, {}
for i, l in ipairs(lines) do
  local key, kind, limit, amount, mode = l[1], l[2], l[4], l[5], l[6]
  local window, period, window_ms, margin = l[7], l[8], l[9], l[10]
  limit = effective_limit(key, limit)
  local spent, reserved = 0, 0
  if kind == 'duration' then
    local t0 = redis.call('GET', P .. 't0:' .. key)
    if t0 then spent = math.floor((now - tonumber(t0)) / 1000) end
  else
    reserved = num(P .. 'r:' .. key)
    if kind == 'counter' then
      if window == 'rolling' then spent = rolling_spent(key, window_ms)
      else spent = num(P .. 's:' .. key .. '|' .. period) end
    end
  end
  states[i] = {limit, spent, reserved}
  local over
  if kind == 'duration' then over = spent >= limit
  elseif kind == 'concurrency' then over = reserved + amount > limit
  else over = spent + reserved + amount > limit end
  if mode == 'advisory' then
    if over then warned[#warned + 1] = tostring(i - 1) end
  elseif blocked == nil then
    local blocks = over
    if kind == 'counter' then
      if mode == 'actuals_only' then blocks = spent >= limit
      elseif mode == 'soft_gate' then blocks = spent + reserved + amount > limit + margin end
    end
    if blocks then blocked = i end
  end
end

local function retry_after(i)
  local l, st = lines[i], states[i]
  if l[2] == 'concurrency' then return 1000 end
  if l[7] ~= 'rolling' then return -1 end
  local need = st[2] + st[3] + l[5] - st[1]
  if l[5] > st[1] or need > st[2] then return -1 end
  local freed = 0
  local evs = redis.call('ZRANGE', P .. 'e:' .. l[1], 0, -1, 'WITHSCORES')
  for j = 1, #evs, 2 do
    freed = freed + tonumber(string.match(evs[j], ':(%-?%d+)$'))
    if freed >= need then
      local r = tonumber(evs[j + 1]) + l[9] - now + 1
      if r < 1 then r = 1 end
      return r
    end
  end
  return -1
end

local function encode(ok, b, retry)
  local parts = {ok, b, retry, table.concat(warned, ',')}
  for i, st in ipairs(states) do parts[#parts + 1] = fmt(st[1]) .. ',' .. fmt(st[2]) .. ',' .. fmt(st[3]) end
  return table.concat(parts, ';')
end

if dry then return {0, encode('1', '-1', '-1')} end

if blocked then
  local result = encode('0', tostring(blocked - 1), fmt(retry_after(blocked)))
  redis.call('HSET', rkey, 'state', 'refused', 'result', result)
  redis.call('PEXPIRE', rkey, ARGV[7])
  return {0, result}
end

for i, l in ipairs(lines) do
  if l[2] == 'duration' then
    redis.call('SET', P .. 't0:' .. l[1], fmt(now), 'NX')
  else
    redis.call('INCRBY', P .. 'r:' .. l[1], fmt(l[5]))
    states[i][3] = states[i][3] + l[5]
  end
end
local result = encode('1', '-1', '-1')
redis.call('HSET', rkey, 'state', 'reserved', 'result', result, 'lines', ARGV[4], 'meta', ARGV[5],
  'estimate', ARGV[6], 'created_at', fmt(now))
redis.call('ZADD', P .. 'exp', fmt(now + ttl), rid)
return {0, result}
