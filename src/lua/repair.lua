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
-- KEYS[1]  the expiry index (sorted set: member -> when the reaper looks)
-- ARGV[1]  operation: inspect | reindex | requeue
-- ARGV[2]  session key prefix, ARGV[3] ledger prefix, ARGV[4] user-index prefix
-- ARGV[5]  layout: lean | ledger, ARGV[6] look-ahead in ms
-- ARGV[7…] the operation's arguments.
--
-- Per-session keys are built from the prefixes, as in `session.lua`: in a
-- partitioned deployment they carry the partition's hash tag, so everything
-- one call touches lives in one slot. A user index member is the id's 64
-- hex characters or its 32 bytes (the lean layout); an expiry index member
-- is also either, or (the lean layout's) the id's first 30 bytes with its
-- last two in the score, as `session.lua` writes it (`escore`). All are read.

local expiry = KEYS[1]
local op = ARGV[1]
local sp = ARGV[2]
local lp = ARGV[3]
local up = ARGV[4]
local lean = ARGV[5] == 'lean'
local ahead = tonumber(ARGV[6])

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

-- The score of a session in an index under either member form.
local function score(key, id, m)
  return redis.call('ZSCORE', key, m) or redis.call('ZSCORE', key, id)
end

-- The score of a session in the expiry index under any member form.
local function expiry_score(id, m)
  return redis.call('ZSCORE', expiry, string.sub(m, 1, 30)) or score(expiry, id, m)
end

-- Files a session in the expiry index at `at` (ms) under this layout's
-- member, and removes the other forms: `session.lua`'s `file`.
local function file(id, m, at)
  local w, s = id, at
  if lean then
    local a, b = string.byte(m, 31, 32)
    local f = (a * 256 + b) / 1024
    w, s = string.sub(m, 1, 30), math.floor((at - f) / 64) * 64 + f
    redis.call('ZREM', expiry, m, id)
  else
    redis.call('ZREM', expiry, string.sub(m, 1, 30), m)
  end
  redis.call('ZADD', expiry, s, w)
end

if op == 'inspect' then
  -- ARGV[7] the session id, ARGV[8] its 32 bytes, ARGV[9…] users whose index
  -- to look in. Reply (all strings, '' for "none"): Redis's clock in ms, '1'
  -- when the key exists, its JSON, its PTTL, the raw ledger, the ledger's
  -- PTTL, the expiry score, the score in the index of the ledger's user,
  -- then one score per user asked about.
  local id = ARGV[7]
  local m = ARGV[8]
  local json = redis.call('GET', sp .. id)
  local ledger = redis.call('GET', lp .. id)
  local _, _, ledger_user = read_ledger(id)
  local in_ledger_user = false
  if ledger_user and ledger_user ~= '' then
    in_ledger_user = score(up .. ledger_user, id, m)
  end
  local out = {
    int(now),
    json and '1' or '0',
    json or '',
    int(redis.call('PTTL', sp .. id)),
    ledger or '',
    int(redis.call('PTTL', lp .. id)),
    expiry_score(id, m) or '',
    in_ledger_user or '',
  }
  for i = 9, #ARGV do
    out[#out + 1] = score(up .. ARGV[i], id, m) or ''
  end
  return out
elseif op == 'reindex' then
  -- Rebuilds a live session's derived state from what the log says it is:
  -- the key (JSON and TTL), its ledger where the layout keeps one, the
  -- expiry index and the user index. Only when the key still holds exactly
  -- what the caller inspected (or is still absent), so that a write since
  -- then is never undone; never for a session whose ledger says it ended.
  -- `old_user`: the user of the inspected JSON.
  local id = ARGV[7]
  local m = ARGV[8]
  local present = ARGV[9] == '1'
  local inspected = ARGV[10]
  local json = ARGV[11]
  local seq = tonumber(ARGV[12])
  local user = ARGV[13]
  local deadline = tonumber(ARGV[14])
  local tomb = tonumber(ARGV[15])
  local old_user = ARGV[16]
  local cur = redis.call('GET', sp .. id)
  if present then
    if cur ~= inspected then
      return { 'moved' }
    end
  elseif cur then
    return { 'moved' }
  end
  local have, status, ledger_user = read_ledger(id)
  if have and status ~= 'live' then
    return { 'ended', status }
  end
  if not cur and have and have ~= seq then
    return { 'moved' }
  end
  if not present then
    old_user = ledger_user or ''
  end
  local remaining = deadline - now
  if remaining <= 0 then
    return { 'expired' }
  end
  local w = id
  if lean then
    w = m
  end
  local other = w == m and id or m
  redis.call('SET', sp .. id, json, 'PX', remaining)
  local at = deadline
  if have or not lean or remaining <= ahead then
    redis.call('SET', lp .. id, int(seq) .. '|live|' .. user, 'PX', remaining + tomb)
  else
    at = deadline - ahead
  end
  file(id, m, at)
  if user ~= '' then
    redis.call('ZREM', up .. user, other)
    redis.call('ZADD', up .. user, 'NX', now_us, w)
  end
  if old_user ~= '' and old_user ~= user then
    redis.call('ZREM', up .. old_user, m, id)
  end
  return { 'ok' }
elseif op == 'requeue' then
  -- A session past its deadline (no key) whose ledger is live at `seq` but
  -- which is missing from the expiry index: puts it back, so that the reaper
  -- appends its `expired` event through `session.lua`.
  local id = ARGV[7]
  local m = ARGV[8]
  local seq = tonumber(ARGV[9])
  local deadline = tonumber(ARGV[10])
  if redis.call('EXISTS', sp .. id) == 1 then
    return { 'moved' }
  end
  local have, status = read_ledger(id)
  if not have or status ~= 'live' or have ~= seq then
    return { 'moved' }
  end
  if expiry_score(id, m) then
    return { 'ok' }
  end
  file(id, m, deadline)
  return { 'ok' }
end
return redis.error_reply('unknown operation ' .. tostring(op))
