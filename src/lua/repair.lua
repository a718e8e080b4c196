-- vedfolnir-sessions: one session's derived Redis state, read and put right
-- atomically, for `verify`, `verify --repair` and the database sweep of
-- overdue sessions.
--
-- This script and `src/recovery/layout.rs` are the only places outside the
-- store that know how a session is laid out in Redis (the key, its ledger,
-- the expiry index, the user index). It never appends to the stream: every
-- event goes through `session.lua`. It never re-encodes session JSON: it
-- stores what the caller folded from the log.
--
-- KEYS[1]  the expiry index (sorted set: session id -> deadline in ms)
-- ARGV[1]  operation: inspect | reindex | requeue
-- ARGV[2]  session key prefix, ARGV[3] ledger prefix, ARGV[4] user-index prefix
-- ARGV[5…] the operation's arguments.
--
-- Per-session keys are built from the prefixes, as in `session.lua`: in a
-- partitioned deployment they carry the partition's hash tag, so everything
-- one call touches lives in one slot.

local expiry = KEYS[1]
local op = ARGV[1]
local sp = ARGV[2]
local lp = ARGV[3]
local up = ARGV[4]

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

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

if op == 'inspect' then
  -- ARGV[5] the session id, ARGV[6…] users whose index to look in.
  -- Reply (all strings, '' for "none"): Redis's clock in ms, '1' when the
  -- key exists, its JSON, its PTTL, the raw ledger, the ledger's PTTL, the
  -- expiry score, the score in the index of the ledger's user, then one
  -- score per user asked about.
  local id = ARGV[5]
  local json = redis.call('GET', sp .. id)
  local ledger = redis.call('GET', lp .. id)
  local score = redis.call('ZSCORE', expiry, id)
  local _, _, ledger_user = read_ledger(id)
  local in_ledger_user = false
  if ledger_user and ledger_user ~= '' then
    in_ledger_user = redis.call('ZSCORE', up .. ledger_user, id)
  end
  local out = {
    int(now),
    json and '1' or '0',
    json or '',
    int(redis.call('PTTL', sp .. id)),
    ledger or '',
    int(redis.call('PTTL', lp .. id)),
    score or '',
    in_ledger_user or '',
  }
  for i = 6, #ARGV do
    out[#out + 1] = redis.call('ZSCORE', up .. ARGV[i], id) or ''
  end
  return out
elseif op == 'reindex' then
  -- Rebuilds a live session's derived state from what the log says it is:
  -- the key (JSON and TTL), the ledger, the expiry index and the user index.
  -- Only when the key still holds exactly what the caller inspected (or is
  -- still absent), so that a write since then is never undone; never for a
  -- session whose ledger says it ended.
  local id = ARGV[5]
  local present = ARGV[6] == '1'
  local inspected = ARGV[7]
  local json = ARGV[8]
  local seq = tonumber(ARGV[9])
  local user = ARGV[10]
  local deadline = tonumber(ARGV[11])
  local tomb = tonumber(ARGV[12])
  local cur = redis.call('GET', sp .. id)
  if present then
    if cur ~= inspected then
      return { 'moved' }
    end
  elseif cur then
    return { 'moved' }
  end
  local have, status, old_user = read_ledger(id)
  if have and status ~= 'live' then
    return { 'ended', status }
  end
  if not cur and have and have ~= seq then
    return { 'moved' }
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
  if old_user and old_user ~= '' and old_user ~= user then
    redis.call('ZREM', up .. old_user, id)
  end
  return { 'ok' }
elseif op == 'requeue' then
  -- A session past its deadline (no key) whose ledger is live at `seq` but
  -- which is missing from the expiry index: puts it back, so that the reaper
  -- appends its `expired` event through `session.lua`.
  local id = ARGV[5]
  local seq = tonumber(ARGV[6])
  local deadline = tonumber(ARGV[7])
  if redis.call('EXISTS', sp .. id) == 1 then
    return { 'moved' }
  end
  local have, status = read_ledger(id)
  if not have or status ~= 'live' or have ~= seq then
    return { 'moved' }
  end
  redis.call('ZADD', expiry, 'NX', deadline, id)
  return { 'ok' }
end
return redis.error_reply('unknown operation ' .. tostring(op))
