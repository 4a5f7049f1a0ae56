-- Forward-only view writes (projections/viewstore.py), many per call: one script call carries
-- every market write of a batch, so the client packs one command instead of hundreds.
--
-- For write i (1-based): KEYS[i] is the view key and ARGV[5*(i-1)+1 .. +5] are
--   op       "set": SET the JSON value when its version is newer than the stored one
--            "lpush": LPUSH onto a capped list when newer than the list's head
--   value    the JSON value
--   version  its version (a number)
--   field    the top-level JSON field of a stored value that holds its version
--   extra    set: expire_at_ms (0: no expiry); lpush: the cap
--
-- Returns one number per write: 1 written, 0 not newer, -1 already expired (nothing written).
-- A stored value that is not JSON, or lacks the field, is overwritten: it cannot be compared.

-- The version is read with a pattern instead of decoding the whole value (a 20-level book is
-- ~1 KB of JSON; cjson.decode of it cost more than the rest of the write). The views written
-- here are flat objects, so the first `"field":` is the top-level one; cjson is the fallback.
local function held_version(raw, field)
  if not raw then return nil end
  local s = string.match(raw, '"' .. field .. '":%s*(%-?[%d%.eE%+%-]+)')
  if s then return tonumber(s) end
  local ok, doc = pcall(cjson.decode, raw)
  if not ok or type(doc) ~= 'table' then return nil end
  return tonumber(doc[field])
end

local now_ms = nil
local function server_now_ms()
  -- The server's clock decides, so every writer (live, replay, a second host) agrees.
  if not now_ms then
    local t = redis.call('TIME')
    now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now_ms
end

local function set_if_newer(key, value, version, field, expire_at)
  if expire_at > 0 and expire_at <= server_now_ms() then return -1 end
  local held = held_version(redis.call('GET', key), field)
  if held and held >= version then return 0 end
  if expire_at > 0 then
    redis.call('SET', key, value, 'PXAT', expire_at)
  else
    redis.call('SET', key, value)
  end
  return 1
end

local function push_if_newer(key, value, version, field, cap)
  local held = held_version(redis.call('LINDEX', key, 0), field)
  if held and held >= version then return 0 end
  redis.call('LPUSH', key, value)
  redis.call('LTRIM', key, 0, cap - 1)
  return 1
end

local out = {}
for i = 1, #KEYS do
  local b = (i - 1) * 5
  local op, version, extra = ARGV[b + 1], tonumber(ARGV[b + 3]), tonumber(ARGV[b + 5])
  if op == 'set' then
    out[i] = set_if_newer(KEYS[i], ARGV[b + 2], version, ARGV[b + 4], extra)
  elseif op == 'lpush' then
    out[i] = push_if_newer(KEYS[i], ARGV[b + 2], version, ARGV[b + 4], extra)
  else
    return redis.error_reply('views.lua: unknown operation ' .. tostring(op))
  end
end
return out
