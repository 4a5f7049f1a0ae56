-- Exactly-once appends to the account's event streams (P:account_events, P:position_events),
-- written by projections/shell/viewstore.py for `StreamAppend` (projections/core/outputs.py).
-- A part of the function library (projections/shell/functions.py): `stream_append(keys, args)`.
--
-- keys[1] the stream
-- args[1] at_ms: the event's time in ms, the time part of the entry id
-- args[2] event_key: the event's name; a duplicate frame, a redelivery or a replay has the same
-- args[3] max_age_ms: the stream keeps this much (MINID now - max_age_ms: exact, for streams
--         of a few events a second at most; `~` would keep a lone old node for ever)
-- args[4..] field, value, field, value, ... (the entry; `event_key` is added here)
--
-- Returns 1 appended, 0 already there (a duplicate), -1 older than max_age_ms (trimmed away
-- anyway: nothing written).
--
-- The entry id is `at_ms-0`, or the next sequence number after the last entry when the event
-- is not newer than it: stream ids only grow, and an event must never be lost for arriving
-- late. So any event not newer than the last entry may already be there, at its own time or
-- after it: the entries from `at_ms` on are searched for its key. The search is bounded
-- (SEARCH entries): these streams see a few events a second at most, so a duplicate lies
-- within it unless more events than that came between its time and the moment it was first
-- appended.

local SEARCH = 500

local function stream_append(keys, args)
  local key, at, event_key = keys[1], tonumber(args[1]), args[2]
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local minid = math.max(now_ms - tonumber(args[3]), 0)
  if at < minid then return -1 end
  local id = string.format('%d-0', at)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #last > 0 then
    local last_ms = tonumber(string.match(last[1][1], '^(%d+)'))
    if at <= last_ms then
      local near = redis.call('XRANGE', key, string.format('%d-0', at), '+', 'COUNT', SEARCH)
      for _, entry in ipairs(near) do
        local f = entry[2]
        for i = 1, #f, 2 do
          if f[i] == 'event_key' and f[i + 1] == event_key then return 0 end
        end
      end
      id = string.format('%d-*', last_ms)
    end
  end
  local entry = {'event_key', event_key}
  for i = 4, #args do entry[#entry + 1] = args[i] end
  redis.call('XADD', key, 'MINID', string.format('%d', minid), id, unpack(entry))
  return 1
end
