-- vedfolnir-sessions: every session mutation in one atomic step.
--
-- The fold runs in Rust; this script only checks the expected version and the
-- tombstone, appends the event the caller built, and stores the JSON the
-- caller computed (it never decodes or re-encodes session JSON).
--
-- KEYS[1]  the event stream
-- KEYS[2]  the expiry index (sorted set: session id -> deadline in ms)
-- ARGV[1]  operation: create | write | end | rotate | destroy_user | expire |
--          restore | apply
-- ARGV[2]  session key prefix, ARGV[3] ledger prefix, ARGV[4] user-index prefix
-- ARGV[5…] the operation's arguments, read in order with arg().
--
-- Per-session keys are built from the prefixes. In a partitioned deployment
-- the prefixes and both KEYS carry the partition's hash tag, so everything one
-- call touches lives in one slot.
--
-- Ledger value: "<seq>|<status>|<user_id>" with status live, destroyed or
-- expired. Deadlines use the Redis clock (TIME), never a writer's clock.

local stream = KEYS[1]
local expiry = KEYS[2]
local op = ARGV[1]
local sp = ARGV[2]
local lp = ARGV[3]
local up = ARGV[4]

local argi = 4
local function arg()
  argi = argi + 1
  return ARGV[argi]
end
local function rest()
  local out = {}
  for i = argi + 1, #ARGV do
    out[#out + 1] = ARGV[i]
  end
  return out
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
-- Creation order in the user index needs finer steps than a millisecond.
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local meta = { occurred = '', schema = '', tp = '', source = '' }
local function read_meta()
  meta.occurred = arg()
  meta.schema = arg()
  meta.tp = arg()
end

local function int(n)
  return string.format('%d', n)
end

local function read_ledger(id)
  local v = redis.call('GET', lp .. id)
  if not v then
    return nil
  end
  local seq, status, user = string.match(v, '^(%d+)|(%a+)|(.*)$')
  return tonumber(seq), status, user
end

local function append(id, seq, kind, user, payload, event_id)
  local a = { stream, '*',
    'event_id', event_id, 'session_id', id, 'seq', int(seq), 'type', kind,
    'occurred_at', meta.occurred, 'user_id', user, 'schema', meta.schema,
    'payload', payload }
  if meta.tp ~= '' then
    a[#a + 1] = 'traceparent'
    a[#a + 1] = meta.tp
  end
  if meta.source ~= '' then
    a[#a + 1] = 'source'
    a[#a + 1] = meta.source
  end
  return redis.call('XADD', unpack(a))
end

local function store_live(id, seq, json, ttl, tomb, user, old_user)
  redis.call('SET', sp .. id, json, 'PX', ttl)
  redis.call('SET', lp .. id, int(seq) .. '|live|' .. user, 'PX', ttl + tomb)
  redis.call('ZADD', expiry, now + ttl, id)
  if user ~= '' then
    redis.call('ZADD', up .. user, 'NX', now_us, id)
  end
  if old_user and old_user ~= '' and old_user ~= user then
    redis.call('ZREM', up .. old_user, id)
  end
end

local function store_end(id, seq, status, user, tomb)
  redis.call('DEL', sp .. id)
  redis.call('SET', lp .. id, int(seq) .. '|' .. status .. '|' .. user, 'PX', tomb)
  redis.call('ZREM', expiry, id)
  if user ~= '' then
    redis.call('ZREM', up .. user, id)
  end
end

-- The live session's seq and user, or nil and the reply for the caller.
local function current(id, expected)
  local seq, status, user = read_ledger(id)
  if not seq then
    return nil, { 'missing' }
  end
  if status ~= 'live' then
    return nil, { 'ended', status }
  end
  if redis.call('EXISTS', sp .. id) == 0 then
    -- Past its deadline; the reaper writes its `expired` event.
    return nil, { 'missing' }
  end
  if expected >= 0 and seq ~= expected then
    return nil, { 'conflict', redis.call('GET', sp .. id) }
  end
  return seq, user
end

-- The user's live sessions, oldest first, leaving out `skip`. Index entries of
-- ended sessions are dropped on the way.
local function live_sessions(user, skip)
  local live = {}
  for _, id in ipairs(redis.call('ZRANGE', up .. user, 0, -1)) do
    if id ~= skip then
      local seq, status = read_ledger(id)
      if not seq or status ~= 'live' then
        redis.call('ZREM', up .. user, id)
      elseif redis.call('EXISTS', sp .. id) == 1 then
        live[#live + 1] = { id, seq }
      end
    end
  end
  return live
end

-- Ends the user's oldest sessions so that one more fits under `max`.
-- Returns the ended ids, or nil and the number of event ids it needs.
local function evict(user, max, skip, ids, tomb)
  if user == '' or max <= 0 then
    return {}
  end
  local live = live_sessions(user, skip)
  local excess = #live + 1 - max
  if excess <= 0 then
    return {}
  end
  if excess > #ids then
    return nil, excess
  end
  local ended = {}
  for i = 1, excess do
    local id, seq = live[i][1], live[i][2]
    local xid = append(id, seq + 1, 'destroyed', user, '{"reason":"evicted"}', ids[i])
    store_end(id, seq + 1, 'destroyed', user, tomb)
    ended[#ended + 1] = id .. ' ' .. int(seq + 1) .. ' ' .. xid
  end
  return ended
end

if op == 'create' then
  local id = arg()
  local json = arg()
  local ttl = tonumber(arg())
  local tomb = tonumber(arg())
  local user = arg()
  local max = tonumber(arg())
  local event_id = arg()
  local payload = arg()
  read_meta()
  local spare = rest()
  if redis.call('EXISTS', lp .. id) == 1 then
    return { 'exists' }
  end
  local ended, need = evict(user, max, id, spare, tomb)
  if not ended then
    return { 'need_ids', int(need) }
  end
  local sid = append(id, 1, 'created', user, payload, event_id)
  store_live(id, 1, json, ttl, tomb, user, nil)
  return { 'ok', sid, unpack(ended) }
elseif op == 'write' then
  local id = arg()
  local expected = tonumber(arg())
  local json = arg()
  local ttl = tonumber(arg())
  local tomb = tonumber(arg())
  local user = arg()
  local kind = arg()
  local event_id = arg()
  local payload = arg()
  read_meta()
  local seq, old_user = current(id, expected)
  if not seq then
    return old_user
  end
  local sid = append(id, seq + 1, kind, user, payload, event_id)
  store_live(id, seq + 1, json, ttl, tomb, user, old_user)
  return { 'ok', sid }
elseif op == 'end' then
  local id = arg()
  local expected = tonumber(arg())
  local kind = arg()
  local status = arg()
  local tomb = tonumber(arg())
  local event_id = arg()
  local payload = arg()
  read_meta()
  local seq, user = current(id, expected)
  if not seq then
    return user
  end
  local sid = append(id, seq + 1, kind, user, payload, event_id)
  store_end(id, seq + 1, status, user, tomb)
  return { 'ok', sid, int(seq + 1), user }
elseif op == 'rotate' then
  local old = arg()
  local expected = tonumber(arg())
  local new = arg()
  local json = arg()
  local ttl = tonumber(arg())
  local tomb = tonumber(arg())
  local user = arg()
  local max = tonumber(arg())
  local end_id = arg()
  local end_payload = arg()
  local create_id = arg()
  local create_payload = arg()
  read_meta()
  local spare = rest()
  local seq, old_user = current(old, expected)
  if not seq then
    return old_user
  end
  if redis.call('EXISTS', lp .. new) == 1 then
    return { 'exists' }
  end
  local ended, need = evict(user, max, old, spare, tomb)
  if not ended then
    return { 'need_ids', int(need) }
  end
  local oxid = append(old, seq + 1, 'destroyed', old_user, end_payload, end_id)
  store_end(old, seq + 1, 'destroyed', old_user, tomb)
  local sid = append(new, 1, 'created', user, create_payload, create_id)
  store_live(new, 1, json, ttl, tomb, user, nil)
  return { 'ok', sid, oxid, old_user, unpack(ended) }
elseif op == 'destroy_user' then
  local user = arg()
  local tomb = tonumber(arg())
  local payload = arg()
  read_meta()
  local ids = rest()
  local live = live_sessions(user, nil)
  if #live > #ids then
    return { 'need_ids', int(#live) }
  end
  local ended = { 'ok', '' }
  for i, s in ipairs(live) do
    local xid = append(s[1], s[2] + 1, 'destroyed', user, payload, ids[i])
    store_end(s[1], s[2] + 1, 'destroyed', user, tomb)
    ended[#ended + 1] = s[1] .. ' ' .. int(s[2] + 1) .. ' ' .. xid
  end
  return ended
elseif op == 'expire' then
  local id = arg()
  local score = tonumber(arg())
  local tomb = tonumber(arg())
  local event_id = arg()
  local payload = arg()
  read_meta()
  local s = redis.call('ZSCORE', expiry, id)
  if not s or tonumber(s) ~= score or score > now then
    -- Touched since the reaper looked, or not due yet.
    return { 'skip' }
  end
  if redis.call('EXISTS', sp .. id) == 1 then
    return { 'skip' }
  end
  local seq, status, user = read_ledger(id)
  if not seq or status ~= 'live' then
    redis.call('ZREM', expiry, id)
    return { 'gone' }
  end
  local sid = append(id, seq + 1, 'expired', user, payload, event_id)
  store_end(id, seq + 1, 'expired', user, tomb)
  return { 'ok', sid, int(seq + 1), user }
elseif op == 'restore' then
  -- Re-materialize a session from the audit database (replay, a read during
  -- recovery, the base of a projection). The one rule of ending: nothing
  -- comes back that Redis knows has ended, or knows a newer state of, and
  -- nothing past its deadline. A ledger at the same seq without its key (a
  -- key evicted or deleted by hand) is restored.
  local id = arg()
  local json = arg()
  local seq = tonumber(arg())
  local user = arg()
  local deadline = tonumber(arg())
  local tomb = tonumber(arg())
  local have, status = read_ledger(id)
  if have and status ~= 'live' then
    return { 'ended', status, int(have) }
  end
  if have and have > seq then
    return { 'newer', int(have) }
  end
  if have and have == seq and redis.call('EXISTS', sp .. id) == 1 then
    return { 'current', int(have) }
  end
  local remaining = deadline - now
  if remaining <= 0 then
    return { 'expired' }
  end
  redis.call('SET', sp .. id, json, 'PX', remaining)
  redis.call('SET', lp .. id, int(seq) .. '|live|' .. user, 'PX', remaining + tomb)
  redis.call('ZADD', expiry, deadline, id)
  if user ~= '' then
    redis.call('ZADD', up .. user, 'NX', now_us, id)
  end
  return { 'ok', '' }
elseif op == 'apply' then
  -- Projection of an event staged in the audit database while Redis was
  -- unreachable. The event keeps its id; Redis gives it its place: right
  -- after what Redis holds when that is the state the caller folded on
  -- (`base`), or after the end when the session has ended meanwhile (the
  -- event is logged, the session stays ended). Applied at most once: a
  -- marker per event id outlives any retry.
  local id = arg()
  local base = tonumber(arg())
  local json = arg()
  local ttl = tonumber(arg())
  local tomb = tonumber(arg())
  local user = arg()
  local kind = arg()
  local status_after = arg()
  local event_id = arg()
  local payload = arg()
  read_meta()
  meta.source = 'fallback'
  local applied = lp .. '~' .. event_id
  if redis.call('EXISTS', applied) == 1 then
    return { 'applied' }
  end
  local have, status, old_user = read_ledger(id)
  local sid
  if have and status ~= 'live' then
    redis.call('SET', applied, '1', 'PX', tomb)
    if kind == 'destroyed' or kind == 'expired' then
      -- Already ended: an end is in the log once.
      return { 'applied' }
    end
    sid = append(id, have + 1, kind, old_user, payload, event_id)
    redis.call('SET', lp .. id, int(have + 1) .. '|' .. status .. '|' .. old_user, 'KEEPTTL')
    return { 'ok', sid, int(have + 1), 'ended' }
  end
  if (have or 0) ~= base then
    if have and redis.call('EXISTS', sp .. id) == 1 then
      return { 'conflict', redis.call('GET', sp .. id) }
    end
    return { 'conflict' }
  end
  if have and redis.call('EXISTS', sp .. id) == 0 then
    -- Live in the ledger but past its deadline in Redis: the caller restores
    -- it first when its deadline in the database allows.
    return { 'missing' }
  end
  sid = append(id, base + 1, kind, user, payload, event_id)
  if status_after == 'live' then
    store_live(id, base + 1, json, ttl, tomb, user, old_user)
  else
    store_end(id, base + 1, status_after, user, tomb)
  end
  redis.call('SET', applied, '1', 'PX', tomb)
  return { 'ok', sid, int(base + 1), status_after }
end
return redis.error_reply('unknown operation ' .. tostring(op))
