-- The lease of an exclusive projection (projections/shell/lease.py): a string holding the
-- holder's name. A part of the function library (projections/shell/functions.py).

-- Take the lease if free or already ours; returns 1 when held by us afterwards.
-- keys[1] lease key, args[1] holder, args[2] TTL in ms
local function lease_acquire(keys, args)
  local held = redis.call('GET', keys[1])
  if held == false or held == args[1] then
    redis.call('SET', keys[1], args[1], 'PX', args[2])
    return 1
  end
  return 0
end

-- Extend (or delete, with TTL 0) only when still ours; returns 1 when it was ours.
local function lease_renew(keys, args)
  if redis.call('GET', keys[1]) == args[1] then
    if tonumber(args[2]) > 0 then
      redis.call('PEXPIRE', keys[1], args[2])
    else
      redis.call('DEL', keys[1])
    end
    return 1
  end
  return 0
end
