-- Forward-only view writes (projections/shell/viewstore.py), many per call: one call carries
-- every market write of a batch, so the client packs one command instead of hundreds.
-- A part of the function library (projections/shell/functions.py): `views_write(keys, args)`.
--
-- args[1..3]: max_ahead_ms, repair_slack_ms, max_id_rate (projections.core.plausible.Bounds).
-- For write i (1-based): keys[i] is the view key and args[3 + 6*(i-1) + 1 .. +6] are
--   op       "set": SET the JSON value when its version (a time) is newer than the stored one
--            "seti": the same for a version that is an id (a book's u, a trade id)
--            "lpush": LPUSH onto a capped list when newer than the list's head
--            "merge": merge a JSON array of JSON values into a capped list kept newest first
--                     by `field`, adding only the versions it does not hold (kline history)
--   value    the JSON value
--   version  its version (a number)
--   field    the top-level JSON field of a stored value that holds its version
--   extra    set: expire_at_ms (0: no expiry); lpush, merge: the cap
--   ts       the value's event time in seconds (every view holds it as `timestamp`); 0: none
--
-- Returns one number per write: 1 written, 2 written over a held value that was not obeyed
-- (repaired, below), 0 not newer, -1 already expired (nothing written), -2 refused: an id
-- further past the held one than max_id_rate ids a second could carry it (the shell
-- dead-letters the entry that produced it). A stored value that is not JSON, or lacks the
-- field, is overwritten: it cannot be compared.
--
-- Repair: a held value is not obeyed (its version does not refuse the write) when its event
-- time is ahead of the server's clock by more than max_ahead_ms (written before the folds
-- checked times), or when it holds a version at least as new while the write's event is newer
-- by more than repair_slack_ms (versions and event times of one stream rise together).

-- The version is read with a pattern instead of decoding the whole value (a 20-level book is
-- ~1 KB of JSON; cjson.decode of it cost more than the rest of the write). The views written
-- here are flat objects or start with `timestamp`, so the first `"field":` is the top-level
-- one; cjson is the fallback.
local function held_number(raw, field)
  if not raw then return nil end
  local key = '"' .. field .. '":'
  local at = string.find(raw, key, 1, true)  -- a plain find: memchr, not the pattern engine
  if at then
    local s = string.match(raw, '^%s*(%-?[%d%.eE%+%-]+)', at + #key)
    if s then return tonumber(s) end
  end
  local ok, doc = pcall(cjson.decode, raw)
  if not ok or type(doc) ~= 'table' then return nil end
  return tonumber(doc[field])
end

-- 1: newer (write), 2: held value not obeyed (write), 0: not newer, -2: implausible id jump
local function judge(raw, version, field, ts, ids, ctx)
  local held = held_number(raw, field)
  if not held then return 1 end
  local held_ts = held
  if field ~= 'timestamp' then held_ts = held_number(raw, 'timestamp') end
  if held_ts then
    if held_ts > ctx.now_s() + ctx.ahead_s then return 2 end
    if held >= version and ts > 0 and ts > held_ts + ctx.slack_s then return 2 end
  end
  if held >= version then return 0 end
  if ids and held_ts and ts > 0 and
      version - held > ctx.rate * (math.max(ts - held_ts, 0) + 1) then
    return -2
  end
  return 1
end

local function set_if_newer(key, value, version, field, expire_at, ts, ids, ctx)
  if expire_at > 0 and expire_at <= ctx.now_s() * 1000 then return -1 end
  local verdict = judge(redis.call('GET', key), version, field, ts, ids, ctx)
  if verdict <= 0 then return verdict end
  if expire_at > 0 then
    redis.call('SET', key, value, 'PXAT', expire_at)
  else
    redis.call('SET', key, value)
  end
  return verdict
end

local function push_if_newer(key, value, version, field, cap, ts, ctx)
  local verdict = judge(redis.call('LINDEX', key, 0), version, field, ts, false, ctx)
  local popped = 0
  while verdict == 2 and popped < cap do  -- drop every head that is not obeyed
    redis.call('LPOP', key)
    popped = popped + 1
    verdict = judge(redis.call('LINDEX', key, 0), version, field, ts, false, ctx)
  end
  if verdict <= 0 then return verdict end
  redis.call('LPUSH', key, value)
  redis.call('LTRIM', key, 0, cap - 1)
  if popped > 0 then return 2 end
  return verdict
end

-- The held elements (minus any whose event time is ahead of the server's clock, and minus a
-- second copy of a version) and the new ones the list lacks, sorted newest first, cut to
-- `cap`. Rewritten with DEL + LPUSH (oldest first, so the newest ends at the head) only when
-- something changed: 1 written, 0 nothing new.
local function merge_into_list(key, value, field, cap, ctx)
  local held = redis.call('LRANGE', key, 0, -1)
  local by_version, versions, dropped = {}, {}, false
  local function take(raw)
    local v = held_number(raw, field)
    if v == nil or by_version[v] then return false end
    by_version[v] = raw
    versions[#versions + 1] = v
    return true
  end
  for _, raw in ipairs(held) do
    local ts = held_number(raw, 'timestamp')
    if (ts and ts > ctx.now_s() + ctx.ahead_s) or not take(raw) then dropped = true end
  end
  local added = 0
  for _, raw in ipairs(cjson.decode(value)) do
    if take(raw) then added = added + 1 end
  end
  if added == 0 and not dropped then return 0 end
  table.sort(versions, function(a, b) return a > b end)
  local n = math.min(#versions, cap)
  redis.call('DEL', key)
  local chunk = {}
  for i = n, 1, -1 do
    chunk[#chunk + 1] = by_version[versions[i]]
    if #chunk == 500 or i == 1 then
      redis.call('LPUSH', key, unpack(chunk))
      chunk = {}
    end
  end
  return 1
end

local function views_write(keys, args)
  local now = nil
  local ctx = {ahead_s = tonumber(args[1]) / 1000, slack_s = tonumber(args[2]) / 1000,
               rate = tonumber(args[3])}
  -- The server's clock decides, so every writer (live, replay, a second host) agrees.
  function ctx.now_s()
    if not now then
      local t = redis.call('TIME')
      now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    end
    return now
  end
  local out = {}
  for i = 1, #keys do
    local b = 3 + (i - 1) * 6
    local op, value, version, field = args[b + 1], args[b + 2], tonumber(args[b + 3]), args[b + 4]
    local extra, ts = tonumber(args[b + 5]), tonumber(args[b + 6])
    if op == 'set' or op == 'seti' then
      out[i] = set_if_newer(keys[i], value, version, field, extra, ts, op == 'seti', ctx)
    elseif op == 'lpush' then
      out[i] = push_if_newer(keys[i], value, version, field, extra, ts, ctx)
    elseif op == 'merge' then
      out[i] = merge_into_list(keys[i], value, field, extra, ctx)
    else
      return redis.error_reply('views: unknown operation ' .. tostring(op))
    end
  end
  return out
end
