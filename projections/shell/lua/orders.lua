-- One order transition, atomically: check, state write, open-orders row, both XADDs.
-- Written by projections/shell/orderstore.py; the pure reference is
-- projections.core.orders.apply_write (tests run both on the same events and compare).
-- A part of the function library (projections/shell/functions.py): `order_write(keys, args)`.
--
-- keys[1] state hash (P:order_state:{sym} or P:algo_order_state:{sym}), field = order/algo id
-- keys[2] open hash  (P:open_orders:{sym} or P:open_algo_orders:{sym})
-- keys[3] stream P:orders:{sym}   (MAXLEN ~ args[2])
-- keys[4] stream P:orders         (MINID ~ now - args[3] ms)
-- args[1] JSON: kind, id, status, version [T, rank, qty], allowed_from, fields, rest (or null),
--         source, symbol, created_ms, and for orders quote_add, quote_set, profit_add
-- args[4] max_ahead_ms: a stored state whose update time is further ahead of the server's
--         clock is repaired, not obeyed (neither its status nor its version binds the write)
-- Returns 1 when applied, 0 when refused (duplicate, older, or not allowed from the stored status).

-- exact decimal arithmetic on strings ("-12.50" + "0.125" = "-12.375"): Lua numbers are doubles
local function dec_parts(s)
  s = tostring(s)
  local neg = false
  if string.sub(s, 1, 1) == '-' then neg = true; s = string.sub(s, 2) end
  local ip, fp = string.match(s, '^(%d*)%.?(%d*)$')
  if ip == nil then ip, fp = '0', '' end
  if ip == '' then ip = '0' end
  return neg, ip, fp
end

local function mag_cmp(a, b)  -- equal-length digit strings
  if a == b then return 0 elseif a > b then return 1 else return -1 end
end

local function digits_op(a, b, sub)  -- equal-length digit strings, a >= b when sub
  local out, carry = {}, 0
  for i = #a, 1, -1 do
    local x, y = string.byte(a, i) - 48, string.byte(b, i) - 48
    local d
    if sub then d = x - y - carry else d = x + y + carry end
    if d < 0 then d = d + 10; carry = 1 elseif d > 9 then d = d - 10; carry = 1 else carry = 0 end
    out[i] = string.char(d + 48)
  end
  local r = table.concat(out)
  if carry == 1 then r = '1' .. r end
  return r
end

local function dec_add(a, b)
  local na, ia, fa = dec_parts(a)
  local nb, ib, fb = dec_parts(b)
  local f = math.max(#fa, #fb)
  fa = fa .. string.rep('0', f - #fa); fb = fb .. string.rep('0', f - #fb)
  local n = math.max(#ia, #ib)
  local da = string.rep('0', n - #ia) .. ia .. fa
  local db = string.rep('0', n - #ib) .. ib .. fb
  local neg, r
  if na == nb then
    neg, r = na, digits_op(da, db, false)
  elseif mag_cmp(da, db) >= 0 then
    neg, r = na, digits_op(da, db, true)
  else
    neg, r = nb, digits_op(db, da, true)
  end
  local ip, fp = string.sub(r, 1, #r - f), string.sub(r, #r - f + 1)
  ip = string.gsub(ip, '^0+', '')
  if ip == '' then ip = '0' end
  fp = string.gsub(fp, '0+$', '')  -- Binance's format: no trailing zeros, "0" for zero
  local out = ip
  if fp ~= '' then out = ip .. '.' .. fp end
  if neg and out ~= '0' then out = '-' .. out end
  return out
end

local function qty(s) return tonumber(s) or 0 end

local function newer(v, old)  -- [T, rank, qty] lexicographic
  if v[1] ~= old[1] then return v[1] > old[1] end
  if v[2] ~= old[2] then return v[2] > old[2] end
  return qty(v[3]) > qty(old[3])
end

local function order_write(keys, args)
  local w = cjson.decode(args[1])
  local id = tostring(w.id)
  if type(w.id) == 'number' then id = string.format('%d', w.id) end
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local stored = nil
  local raw = redis.call('HGET', keys[1], id)
  if raw then stored = cjson.decode(raw) end

  local from = ''
  local obeyed = stored ~= nil
  if stored and stored.version[1] > now_ms + tonumber(args[4]) then
    obeyed = false  -- written from a clock far ahead: neither its status nor version binds
  end
  if obeyed then from = stored.status end
  local allowed = false
  for _, s in ipairs(w.allowed_from) do
    if s == from then allowed = true end
  end
  if not allowed then return 0 end
  if obeyed and not newer(w.version, stored.version) then return 0 end

  local fields = {}
  if stored then for k, v in pairs(stored.o) do fields[k] = v end end
  for k, v in pairs(w.fields) do fields[k] = v end

  local created = w.created_ms
  if created == nil or created <= 0 then
    if stored and stored.created_time and stored.created_time > 0 then
      created = stored.created_time
    else
      created = w.version[1]
    end
  end

  local state = {symbol = w.symbol, status = w.status, o = fields, update_time = w.version[1],
                 created_time = created, version = w.version, source = w.source}
  local row = w.rest
  if row ~= cjson.null then  -- fields of the held row that this write does not name live on
    local held = redis.call('HGET', keys[2], id)
    if held then
      for k, v in pairs(cjson.decode(held)) do
        if row[k] == nil then row[k] = v end
      end
    end
  end
  if w.kind == 'order' then
    state.order_id = w.id
    local quote = '0'
    if stored and stored.cum_quote then quote = stored.cum_quote end
    if w.quote_set ~= nil and w.quote_set ~= cjson.null then
      quote = w.quote_set
    else
      quote = dec_add(quote, w.quote_add)
    end
    local profit = '0'
    if stored and stored.realized_profit then profit = stored.realized_profit end
    state.cum_quote = quote
    state.realized_profit = dec_add(profit, w.profit_add)
    state.cum_filled = fields.z or '0'
    state.avg_price = fields.ap or '0'
    if row ~= cjson.null then
      row.cumQuote = quote
      row.time = created
    end
  else
    state.algo_id = w.id
    state.actual_order_id = fields.ai or ''
    if row ~= cjson.null then row.createTime = created end
  end

  local data = cjson.encode(state)
  redis.call('HSET', keys[1], id, data)
  if row == cjson.null then
    redis.call('HDEL', keys[2], id)
  else
    redis.call('HSET', keys[2], id, cjson.encode(row))
  end

  local entry = {'order_id', id, 'status', w.status, 'data', data, 'kind', w.kind,
                 'source', w.source, 'symbol', w.symbol}
  redis.call('XADD', keys[3], 'MAXLEN', '~', args[2], '*', unpack(entry))
  local minid = now_ms - tonumber(args[3])
  if minid < 0 then minid = 0 end
  redis.call('XADD', keys[4], 'MINID', '~', string.format('%d', minid), '*', unpack(entry))
  return 1
end
