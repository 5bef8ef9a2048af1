-- Grow a reservation while its call runs (a stream's output), all lines or
-- none: every counter line of a dimension in the delta must still pass the
-- rules with the delta as amount (its own amount is already in `reserved`;
-- no headroom), every gating duration line must be before its deadline.
-- Then the reserved counters, the lines' amounts and the estimate (what
-- expiry charges) grow and the expiry moves to now + ttl. A closed (or
-- expired) run refuses; an active one is touched as a reserve attempt does.
-- Not idempotent: each call adds. Mirrors EmbeddedStore._extend.
--
-- KEYS[1] prefix "xp:{tag}:"
-- ARGV[1] reservation id   ARGV[2] now_ms   ARGV[3] ttl_ms
-- ARGV[4] delta JSON {usage field: amount > 0}
-- Returns {"ok;found;blocked;reason;deadline_ms", key, "limit,spent,reserved", ...}
-- (-1 for no blocked line / no deadline); {"0;0;-1;;-1"} when not reserved.
local P = KEYS[1]
local rid, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rkey = P .. 'resv:' .. rid
local rec = redis.call('HMGET', rkey, 'state', 'lines', 'estimate', 'run')
if rec[1] ~= 'reserved' then return {'0;0;-1;;-1'} end
local lines, delta = cjson.decode(rec[2]), cjson.decode(ARGV[4])

-- The run: closed or expired refuses; a purged one (gone) is left alone.
local run, runkey, reason = nil, nil, ''
if rec[4] and rec[4] ~= '' then
  run = cjson.decode(rec[4])
  runkey = P .. 'run:' .. run[1]
  local r = redis.call('HMGET', runkey, 'state', 'expires_at')
  if r[1] == 'closed' then reason = 'run_closed'
  elseif not r[1] then run = nil
  elseif tonumber(r[2]) <= now then reason = 'run_expired' end
end

trim_rolling(P, lines, now)
local states, firsts = read_states(P, lines, now)
local blocked = nil
if reason == '' then
  for i, l in ipairs(lines) do
    local kind, st, amount = l[F_KIND], states[i], nil
    if kind == KIND_COUNTER then amount = delta[l[F_DIMENSION]]
    elseif kind == KIND_DURATION then amount = 0 end
    if amount and rule_blocks(kind, l[F_MODE], st[1], st[2], st[3], amount, l[F_MARGIN], 0) then
      blocked = i
      break
    end
  end
end
local ok = reason == '' and blocked == nil

if run and reason == '' then
  local exp = now + run[3]
  redis.call('HSET', runkey, 'seen_at', fmt(now), 'expires_at', fmt(exp))
  redis.call('ZADD', P .. 'ra:' .. run[2], fmt(exp), run[1])
  redis.call('ZADD', P .. 'rp', fmt(exp + run[5]), run[1])
end

if ok then
  for i, l in ipairs(lines) do
    local d = delta[l[F_DIMENSION]]
    if l[F_KIND] == KIND_COUNTER and d then
      redis.call('INCRBY', P .. K_RESERVED .. l[F_KEY], fmt(d))
      l[F_AMOUNT] = l[F_AMOUNT] + d
      states[i][3] = states[i][3] + d
    end
  end
  local estimate = cjson.decode(rec[3])
  for dim, d in pairs(delta) do estimate[dim] = (estimate[dim] or 0) + d end
  redis.call('HSET', rkey, 'lines', encode_lines(lines), 'estimate', encode_counts(estimate))
  redis.call('ZADD', P .. 'exp', fmt(now + ttl), rid)
end

local deadline = earliest_deadline(lines, states, firsts, now)
local out = {table.concat({ok and '1' or '0', '1', blocked and tostring(blocked - 1) or '-1', reason,
  deadline and fmt(deadline) or '-1'}, ';')}
for i, l in ipairs(lines) do
  local st = states[i]
  out[#out + 1] = l[F_KEY]
  out[#out + 1] = fmt(st[1]) .. ',' .. fmt(st[2]) .. ',' .. fmt(st[3])
end
return out
