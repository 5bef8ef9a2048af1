-- The refusal rules of extproc/rules.py (over, blocks, rolling_need, deadline_ms), for the
-- scripts that must decide inside Redis. Prepended to them after the wire
-- prelude (extproc/stores/wire.py); tests/stores/test_rule_vectors.py runs
-- the same vectors through both copies.
local function rule_over(kind, limit, spent, reserved, amount)
  if kind == KIND_DURATION then return spent >= limit end
  if kind == KIND_CONCURRENCY then return reserved + amount > limit end
  return spent + reserved + amount > limit
end

local function rule_blocks(kind, mode, limit, spent, reserved, amount, margin, headroom)
  if mode == MODE_ADVISORY then return false end
  if kind ~= KIND_COUNTER then return rule_over(kind, limit, spent, reserved, amount) end
  if mode == MODE_ACTUALS_ONLY then return spent >= limit end
  if mode == MODE_SOFT_GATE then return spent + reserved + amount + headroom > limit + margin end
  return spent + reserved + amount + headroom > limit
end

local function rule_need(mode, limit, spent, reserved, amount, margin, headroom)
  if mode == MODE_ACTUALS_ONLY then return spent - limit + 1 end
  if mode ~= MODE_SOFT_GATE then margin = 0 end
  return spent + reserved + amount + headroom - limit - margin
end

local function rule_deadline(kind, mode, limit, first, now)
  if kind ~= KIND_DURATION or mode == MODE_ADVISORY then return nil end
  return (first or now) + limit * 1000
end

