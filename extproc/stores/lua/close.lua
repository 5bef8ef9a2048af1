-- Close a reservation: settle (actual usage), release (nothing) or expire
-- (the reserved estimate). The first terminal outcome wins; later calls replay it.
-- Mirrors EmbeddedStore._close (extproc/stores/embedded.py).
--
-- KEYS[1] prefix "xp:{tag}:"
-- ARGV[1] reservation id   ARGV[2] outcome (settled|released|expired)   ARGV[3] now_ms
-- ARGV[4] charged usage JSON {dimension: amount} (ignored unless settled)  ARGV[5] extra meta JSON
-- ARGV[6] ms to remember the closed reservation
-- Returns {found 0|1, replayed 0|1, outcome, charged JSON}
local P = KEYS[1]
local rid, outcome, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local rkey = P .. 'resv:' .. rid
local rec = redis.call('HMGET', rkey, 'state', 'lines', 'estimate', 'charged', 'created_at', 'meta', 'until')
local state = rec[1]
if state and state ~= 'reserved' and tonumber(rec[7]) <= now then
  redis.call('DEL', rkey)  -- past its memory on the callers' clock: forgotten
  state = nil
end
if not state or state == 'refused' then return {0, 0, 'released', '{}'} end
if state ~= 'reserved' then return {1, 1, state, rec[4] or '{}'} end

local charged_json = ARGV[4]
if outcome == 'expired' then charged_json = rec[3] end
if outcome == 'released' then charged_json = '{}' end
local charged = cjson.decode(charged_json)
local lines = cjson.decode(rec[2])
local function fmt(n) return string.format('%d', n) end

for _, l in ipairs(lines) do
  local key, kind, dim, amount, window, period = l[F_KEY], l[F_KIND], l[F_DIMENSION], l[F_AMOUNT], l[F_WINDOW], l[F_PERIOD]
  if kind ~= KIND_DURATION then
    redis.call('DECRBY', P .. K_RESERVED .. key, fmt(amount))
    local c = charged[dim]
    if kind == KIND_COUNTER and c and c ~= 0 then
      if window == WINDOW_ROLLING then
        -- member "rid:now:amount" is unique even if an id is reused after its memory
        local ek, sk = P .. K_EVENTS .. key, P .. K_ROLLING_SUM .. key
        redis.call('ZADD', ek, fmt(now), rid .. ':' .. fmt(now) .. ':' .. fmt(c))
        redis.call('INCRBY', sk, fmt(c))
        redis.call('PEXPIRE', ek, fmt(l[F_WINDOW_MS] * 2))
        redis.call('PEXPIRE', sk, fmt(l[F_WINDOW_MS] * 2))
      else
        local sk = P .. K_SPENT .. key .. '|' .. period
        local v = redis.call('INCRBY', sk, fmt(c))
        -- a calendar bucket expires period_ttl_s after its first charge (longer than the period)
        if window == WINDOW_CALENDAR and l[F_PERIOD_TTL_S] > 0 and v == c then redis.call('EXPIRE', sk, fmt(l[F_PERIOD_TTL_S])) end
      end
    end
  end
end

local keys = {}
for i, l in ipairs(lines) do keys[i] = l[F_KEY] end
redis.call('HSET', rkey, 'state', outcome, 'charged', charged_json, 'closed_at', fmt(now),
  'until', fmt(now + tonumber(ARGV[6])))
redis.call('HDEL', rkey, 'lines', 'meta', 'estimate')
redis.call('PEXPIRE', rkey, ARGV[6])
redis.call('ZREM', P .. 'exp', rid)
redis.call('XADD', P .. 'ledger', '*', 'rid', rid, 'outcome', outcome, 'reserved', rec[3],
  'charged', charged_json, 'meta', rec[6], 'extra', ARGV[5], 'lines', cjson.encode(keys),
  'reserved_at', rec[5], 'closed_at', fmt(now))
return {1, 0, outcome, charged_json}
