-- Reading the lines of one budget tree, for reserve.lua and extend.lua (prepended
-- to every script after rules.lua). Mirrors EmbeddedStore._trim / _read_states.
local function fmt(n) return string.format('%d', n) end

local function event_amount(member) return tonumber(string.match(member, ':(%-?%d+)$')) end

-- Rolling windows drop the charges that left them (ts <= now - window).
local function trim_rolling(P, lines, now)
  for _, l in ipairs(lines) do
    if l[F_KIND] == KIND_COUNTER and l[F_WINDOW] == WINDOW_ROLLING then
      local ek = P .. K_EVENTS .. l[F_KEY]
      local cutoff = fmt(now - l[F_WINDOW_MS])
      local gone = redis.call('ZRANGEBYSCORE', ek, '-inf', cutoff)
      if #gone > 0 then
        local freed = 0
        for _, m in ipairs(gone) do freed = freed + event_amount(m) end
        redis.call('ZREMRANGEBYSCORE', ek, '-inf', cutoff)
        redis.call('DECRBY', P .. K_ROLLING_SUM .. l[F_KEY], fmt(freed))
      end
    end
  end
end

-- Every counter of every line in one MGET, five per line: limit override,
-- credits, the run's lowered limit, reserved (t0 for duration), spent.
-- Returns the states {limit, spent, reserved} (limit = override or the line's
-- limit, + credits, capped by the run's lowered limit) and the first
-- reservation (ms) of each duration line (nil before the first one).
local function read_states(P, lines, now)
  local keys = {}
  for _, l in ipairs(lines) do
    local k, n = l[F_KEY], #keys
    keys[n + 1], keys[n + 2], keys[n + 3] = P .. K_LIMIT .. k, P .. K_CREDIT .. k, P .. K_LOWERED .. k
    if l[F_KIND] == KIND_DURATION then keys[n + 4] = P .. K_FIRST .. k else keys[n + 4] = P .. K_RESERVED .. k end
    if l[F_WINDOW] == WINDOW_ROLLING then keys[n + 5] = P .. K_ROLLING_SUM .. k
    else keys[n + 5] = P .. K_SPENT .. k .. '|' .. l[F_PERIOD] end
  end
  local vals = {}
  if #keys > 0 then vals = redis.call('MGET', unpack(keys)) end
  local function val(j) return tonumber(vals[j] or '0') end
  local states, firsts = {}, {}
  for i, l in ipairs(lines) do
    local b = (i - 1) * 5
    local kind = l[F_KIND]
    local limit = l[F_LIMIT]
    if vals[b + 1] then limit = tonumber(vals[b + 1]) end
    limit = limit + val(b + 2)
    if l[F_RUN] == 1 then
      if vals[b + 3] and tonumber(vals[b + 3]) < limit then limit = tonumber(vals[b + 3]) end
      if l[F_LOWER] >= 0 and l[F_LOWER] < limit then limit = l[F_LOWER] end
    end
    local spent, reserved = 0, 0
    if kind == KIND_DURATION then
      if vals[b + 4] then
        firsts[i] = tonumber(vals[b + 4])
        spent = math.floor((now - firsts[i]) / 1000)
      end
    else
      reserved = val(b + 4)
      if kind == KIND_COUNTER then spent = val(b + 5) end
    end
    states[i] = {limit, spent, reserved}
  end
  return states, firsts
end

-- The earliest wall-clock deadline of the gating duration lines, or nil.
local function earliest_deadline(lines, states, firsts, now)
  local best = nil
  for i, l in ipairs(lines) do
    local d = rule_deadline(l[F_KIND], l[F_MODE], states[i][1], firsts[i], now)
    if d and (best == nil or d < best) then best = d end
  end
  return best
end

-- Lines as JSON with every number written exactly (%d): cjson.encode would round
-- numbers past 14 digits (nano-USD limits), and the store reads them back.
local function encode_lines(lines)
  local out = {}
  for i, l in ipairs(lines) do
    local f = {}
    for j, v in ipairs(l) do
      if type(v) == 'number' then f[j] = fmt(v) else f[j] = cjson.encode(v) end
    end
    out[i] = '[' .. table.concat(f, ',') .. ']'
  end
  return '[' .. table.concat(out, ',') .. ']'
end

-- A flat {name: integer} map as JSON, numbers exact (an estimate, a usage).
local function encode_counts(map)
  local out = {}
  for k, v in pairs(map) do out[#out + 1] = cjson.encode(k) .. ':' .. fmt(v) end
  return '{' .. table.concat(out, ',') .. '}'
end
