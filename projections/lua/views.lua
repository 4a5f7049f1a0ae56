-- Forward-only view writes (projections/viewstore.py). One script, two operations, so one SHA
-- is loaded per connection.
--
-- KEYS[1]  the view key
-- ARGV[1]  "set": SET the JSON value when its version is newer than the stored one
--          "lpush": LPUSH onto a capped list when newer than the list's head
-- ARGV[2]  the JSON value
-- ARGV[3]  its version (a number)
-- ARGV[4]  the JSON field of a stored value that holds its version
-- ARGV[5]  set: expire_at_ms (0: no expiry); lpush: the cap
--
-- Returns 1 written, 0 not newer, -1 already expired (nothing written).
-- A stored value that is not JSON, or lacks the field, is overwritten: it cannot be compared.

local op = ARGV[1]
local version = tonumber(ARGV[3])
local field = ARGV[4]

local function held_version(raw)
  if not raw then return nil end
  local ok, doc = pcall(cjson.decode, raw)
  if not ok or type(doc) ~= 'table' then return nil end
  return tonumber(doc[field])
end

if op == 'set' then
  local expire_at = tonumber(ARGV[5])
  if expire_at > 0 then
    -- The server's clock decides, so every writer (live, replay, a second host) agrees.
    local t = redis.call('TIME')
    local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if expire_at <= now_ms then return -1 end
  end
  local held = held_version(redis.call('GET', KEYS[1]))
  if held and held >= version then return 0 end
  if expire_at > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PXAT', expire_at)
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
  return 1
elseif op == 'lpush' then
  local held = held_version(redis.call('LINDEX', KEYS[1], 0))
  if held and held >= version then return 0 end
  redis.call('LPUSH', KEYS[1], ARGV[2])
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[5]) - 1)
  return 1
end
return redis.error_reply('views.lua: unknown operation ' .. tostring(op))
