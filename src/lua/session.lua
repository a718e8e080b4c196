-- vedfolnir-sessions: every session mutation in one atomic step.
--
-- The fold runs in Rust; this script checks the expected version and the
-- tombstone, appends the event the caller built, and stores the JSON the
-- caller computed. It never decodes session JSON: the live version is the
-- number the canonical JSON ends with (`"_version":N}`).
--
-- A Redis Functions library: the store loads it with `FUNCTION LOAD` under
-- a name derived from its text (`#!lua name=…` and the registration of `run`
-- are added then, see src/store/script.rs), so its top level runs once per
-- load and a call runs only `run`. Every call is an `FCALL`:
--
-- KEYS[1]  the event stream
-- KEYS[2]  the expiry index (sorted set: member -> when the reaper looks)
-- ARGV[1]  operation: create | write | end | rotate | destroy_user | expire |
--          look | restore | apply
-- ARGV[2]  session key prefix, ARGV[3] ledger prefix, ARGV[4] user-index prefix
-- ARGV[5]  layout: lean | ledger
-- ARGV[6]  look-ahead in ms (lean layout)
-- ARGV[7…] the operation's arguments, read in order with arg(); one struct
--          per operation in src/store/script.rs (Create, Write, End, …)
--          names them and writes them in this order.
--
-- Per-session keys are built from the prefixes. In a partitioned deployment
-- the prefixes and both KEYS carry the partition's hash tag, so everything one
-- call touches lives in one slot.
--
-- Ledger value: "<seq>|<status>|<user_id>", status live, destroyed or expired.
-- An ended session's ledger is its tombstone. A live one's is a look: the
-- version and user the reaper needs once Redis has dropped the key.
--
-- The lean layout writes a live session's key and nothing else on an update:
-- its expiry entry is a lower bound (the reaper looks again when it comes
-- due and files it again from the key's real TTL), the user index changes
-- only when the user does, and a look exists only within the look-ahead of
-- the deadline (written by the reaper) or for sessions whose timeout is no
-- longer than the look-ahead. A user index member is the 32 raw bytes of the
-- id; an expiry index member is its first 30 bytes, and its last two are in
-- the score (see `escore`). A ledger that exists is always kept current.
--
-- The ledger layout writes what the previous release wrote and reads: a
-- ledger for every live session, the exact deadline in the expiry index and
-- hex members. Both layouts read each other's keys.
--
-- Deadlines use the Redis clock (TIME), never a writer's clock; TIME is read
-- only by steps that write one.

-- Per-call state: set by `run` at the start of every call. Redis runs one
-- call at a time, so these library-level locals never hold another call's
-- values.
local KEYS, ARGV
local stream, expiry, op, sp, lp, up, lean, ahead
local argi

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

local now, now_us
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    -- Creation order in the user index needs finer steps than a millisecond.
    now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
end

local meta = { occurred = '', schema = '', tp = '', source = '' }
local function read_meta()
  meta.occurred = arg()
  meta.schema = arg()
  meta.tp = arg()
end

local function int(n)
  return string.format('%d', n)
end

-- string.rep('%02x', 32), spelled out: the library's top level runs when
-- it is loaded, where the standard libraries are not reachable yet.
local HEX = '%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x%02x'
-- The id of an index member: 64 hex characters, or the 32 bytes they spell.
local function id_of(m)
  if #m == 32 then
    return string.format(HEX, string.byte(m, 1, 32))
  end
  return m
end
-- The user index member this layout writes for a session: `m` is always
-- the lean one.
local function member(id, m)
  if lean then
    return m
  end
  return id
end
-- Removes a session from a user index under both member forms.
local function unindex(key, id, m)
  redis.call('ZREM', key, m, id)
end

-- The lean layout's expiry index entry. Its member is the id's first 30
-- bytes: a member of up to 30 bytes takes Redis's smallest string header
-- and fits a 32-byte allocation, where 32 bytes take 48 (16 bytes less per
-- session, in the index's skiplist and dict alike). The id's last two bytes
-- are the score's fraction, `f` = their value / 1024, in [0, 64): the score
-- is the greatest `64k + f` not after the time `at` (ms), so an entry is at
-- most 64 ms early and never late, and the score is still a time in ms for
-- every reader. Every such score is a double exactly (under 2^43 ms, the
-- year 2248, with ten bits of fraction). See src/id.rs (`expiry_score`).
local function emember(m)
  return string.sub(m, 1, 30)
end
local function escore(at, m)
  local a, b = string.byte(m, 31, 32)
  local f = (a * 256 + b) / 1024
  return math.floor((at - f) / 64) * 64 + f
end
-- The expiry index's score and member for a session filed at `at`.
local function expiry_entry(id, m, at)
  if lean then
    return escore(at, m), emember(m)
  end
  return at, id
end
-- The expiry members of a session other than `w`, the one this layout
-- writes (the three forms: 30 bytes, 32 bytes, hex).
local function others(id, m, w)
  if w == id then
    return emember(m), m
  end
  return m, id
end
-- Removes a session from the expiry index under every member form.
local function unfile(id, m)
  redis.call('ZREM', expiry, emember(m), m, id)
end

local function parse_ledger(v)
  if not v then
    return nil
  end
  local seq, status, user = string.match(v, '^(%d+)|(%a+)|(.*)$')
  return tonumber(seq), status, user
end

-- The version a session's JSON ends with.
local function version_of(json)
  return tonumber(string.match(json, '"_version":(%d+)}$', math.max(1, #json - 40)))
end

-- The session's JSON (false when absent) and its parsed ledger.
local function state(id)
  local r = redis.call('MGET', sp .. id, lp .. id)
  local lseq, status, user = parse_ledger(r[2])
  return r[1], lseq, status, user
end

local function append(id, seq, kind, user, payload, event_id)
  local a = { stream, '*',
    'event_id', event_id, 'session_id', id, 'seq', int(seq), 'type', kind,
    'occurred_at', meta.occurred, 'schema', meta.schema, 'payload', payload }
  if user ~= '' then
    a[#a + 1] = 'user_id'
    a[#a + 1] = user
  end
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

local function set_ledger(id, seq, user, px)
  redis.call('SET', lp .. id, int(seq) .. '|live|' .. user, 'PX', px)
end

-- Files a session in the expiry index `remaining` ms ahead: the deadline
-- itself where a ledger holds its version, else the look-ahead before it.
-- `again`: it may be filed already, maybe under the other member form.
local function file(id, m, remaining, with_ledger, again)
  clock()
  local at = now + remaining
  if not with_ledger then
    at = at - ahead
  end
  local score, w = expiry_entry(id, m, at)
  if again then
    redis.call('ZREM', expiry, others(id, m, w))
  end
  redis.call('ZADD', expiry, score, w)
end

-- A live session's key at `seq`. `fresh`: its first state here (created,
-- restored, rotated to), so the expiry index gets an entry; an update leaves
-- the entry alone, a lower bound of the new deadline. `had`: it has a ledger.
local function store_live(id, m, seq, json, ttl, tomb, user, old_user, had, fresh)
  redis.call('SET', sp .. id, json, 'PX', ttl)
  local ledger = had or not lean or ttl <= ahead
  if ledger then
    set_ledger(id, seq, user, ttl + tomb)
  end
  if fresh or not lean then
    file(id, m, ttl, ledger, not fresh)
  end
  if user ~= old_user then
    if user ~= '' then
      clock()
      redis.call('ZADD', up .. user, 'NX', now_us, member(id, m))
    end
    if old_user ~= '' then
      unindex(up .. old_user, id, m)
    end
  end
  return ledger
end

-- A write with a time to live of the caller's own (not the configured
-- timeout), in the lean layout: the expiry entry is a lower bound filed for
-- an earlier write's deadline, and this deadline may be earlier. The entry
-- comes down to where `file` would put it now, never up (`LT`); the other
-- member form is dropped so that one entry remains. Only calls with such a
-- time to live pay for it.
local function lower(id, m, ttl, with_ledger)
  clock()
  local at = now + ttl
  if not with_ledger then
    at = at - ahead
  end
  local score, w = expiry_entry(id, m, at)
  redis.call('ZREM', expiry, others(id, m, w))
  redis.call('ZADD', expiry, 'LT', score, w)
end

local function store_end(id, m, seq, status, user, tomb)
  redis.call('DEL', sp .. id)
  redis.call('SET', lp .. id, int(seq) .. '|' .. status .. '|' .. user, 'PX', tomb)
  unfile(id, m)
  if user ~= '' then
    unindex(up .. user, id, m)
  end
end

-- The live session's version, or nil and the reply for the caller. `expected`
-- -1 accepts any version. Also answers whether a ledger exists.
local function current(id, expected)
  local json, lseq, status = state(id)
  if status and status ~= 'live' then
    return nil, { 'ended', status }
  end
  if not json then
    -- Never existed, or past its deadline: the reaper writes `expired`.
    return nil, { 'missing' }
  end
  local v = version_of(json)
  if not v then
    return nil, redis.error_reply('session ' .. id .. ': its JSON does not end with _version')
  end
  if expected >= 0 and v ~= expected then
    return nil, { 'conflict', json }
  end
  return v, json, lseq ~= nil
end

-- The user's live sessions, oldest first, leaving out `skip`: a list of
-- {id, lean member, seq}. Index entries of ended or expired sessions are
-- dropped on the way.
local function live_sessions(user, skip)
  local live = {}
  local listed = {}
  for _, e in ipairs(redis.call('ZRANGE', up .. user, 0, -1)) do
    local id = id_of(e)
    if listed[id] then
      -- Filed under both member forms: keep one.
      redis.call('ZREM', up .. user, e)
    elseif id ~= skip then
      listed[id] = true
      local json, _, status = state(id)
      local v = json and version_of(json)
      if not v or (status and status ~= 'live') then
        redis.call('ZREM', up .. user, e)
      else
        local m = e
        if #e ~= 32 then
          m = string.gsub(id, '%x%x', function(h)
            return string.char(tonumber(h, 16))
          end)
        end
        live[#live + 1] = { id, m, v }
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
  if redis.call('ZCARD', up .. user) + 1 <= max then
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
    local id, m, seq = live[i][1], live[i][2], live[i][3]
    local xid = append(id, seq + 1, 'destroyed', user, '{"reason":"evicted"}', ids[i])
    store_end(id, m, seq + 1, 'destroyed', user, tomb)
    ended[#ended + 1] = id .. ' ' .. int(seq + 1) .. ' ' .. xid
  end
  return ended
end

-- The hot paths of the lean layout, each a function of the library of its
-- own with the keys it touches named in KEYS and only the arguments it
-- reads, since every argument of an FCALL costs Redis time before a line
-- runs. What they leave out, `run` does: the caller takes them only for a
-- lean layout, a time to live longer than the look-ahead, no per-user limit
-- and (for `write`) no change of user and no time to live of the call's own.
-- SCHEMA is the schema of the events the caller builds, set when the
-- library is loaded. On success each answers the stream id alone; any other
-- answer is a list, as from `run`.

-- Appends an event of this release's schema; `user` may be empty, `tp`
-- absent. One call per combination, so that no argument list is built.
local function log(stream, event_id, id, seq, kind, occurred, payload, user, tp)
  if user == '' then
    if not tp then
      return redis.call('XADD', stream, '*', 'event_id', event_id, 'session_id', id,
        'seq', seq, 'type', kind, 'occurred_at', occurred, 'schema', SCHEMA, 'payload', payload)
    end
    return redis.call('XADD', stream, '*', 'event_id', event_id, 'session_id', id,
      'seq', seq, 'type', kind, 'occurred_at', occurred, 'schema', SCHEMA, 'payload', payload,
      'traceparent', tp)
  end
  if not tp then
    return redis.call('XADD', stream, '*', 'event_id', event_id, 'session_id', id,
      'seq', seq, 'type', kind, 'occurred_at', occurred, 'schema', SCHEMA, 'payload', payload,
      'user_id', user)
  end
  return redis.call('XADD', stream, '*', 'event_id', event_id, 'session_id', id,
    'seq', seq, 'type', kind, 'occurred_at', occurred, 'schema', SCHEMA, 'payload', payload,
    'user_id', user, 'traceparent', tp)
end

-- A write of a live session at `expected` (-1: any), its user unchanged.
-- KEYS: stream, session key, ledger key.
-- ARGV: expected, json, ttl, tomb, id, kind, event_id, payload, occurred,
-- user, [traceparent].
-- Its checks are those of `current` (ended, missing, version), written out
-- here rather than called through `state` and `parse_ledger`: the calls and
-- the ledger's full parse cost 0.15 µs a write (5.46 against 5.61 µs,
-- `redis-benchmark`), 3 % of the hot path. A change to one is a change to
-- both.
local function write(keys, argv)
  local r = redis.call('MGET', keys[2], keys[3])
  local json, status = r[1], r[2] and string.match(r[2], '^%d+|(%a+)|')
  if status and status ~= 'live' then
    return { 'ended', status }
  end
  if not json then
    return { 'missing' }
  end
  local v = version_of(json)
  if not v then
    return redis.error_reply('session ' .. argv[5] .. ': its JSON does not end with _version')
  end
  local expected = tonumber(argv[1])
  if v ~= expected and expected >= 0 then
    return { 'conflict', json }
  end
  local seq = v + 1
  local user = argv[10]
  local sid = log(keys[1], argv[7], argv[5], seq, argv[6], argv[9], argv[8], user, argv[11])
  redis.call('SET', keys[2], argv[2], 'PX', argv[3])
  if status then
    -- A look the reaper took: kept current, as every ledger.
    redis.call('SET', keys[3], seq .. '|live|' .. user, 'PX', argv[3] + argv[4])
  end
  return sid
end

-- A new session.
-- KEYS: stream, session key, expiry index, [user index].
-- ARGV: json, ttl, look-ahead, id, member, event_id, payload, occurred,
-- user, [traceparent].
-- The id is fresh (256 random bits): only a retry of this create can have
-- written its key before, and nothing can have ended it (nobody else knows
-- its token yet, and its deadline is further away than the look-ahead), so
-- `SET NX` is the whole check.
local function create(keys, argv)
  if not redis.call('SET', keys[2], argv[1], 'PX', argv[2], 'NX') then
    return { 'exists' }
  end
  local sid = log(keys[1], argv[6], argv[4], '1', 'created', argv[8], argv[7], argv[9], argv[10])
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  local m = argv[5]
  redis.call('ZADD', keys[3], escore(s * 1000 + math.floor(us / 1000) + argv[2] - argv[3], m),
    emember(m))
  if keys[4] then
    redis.call('ZADD', keys[4], 'NX', s * 1000000 + us, argv[5])
  end
  return sid
end

-- One call: `keys` and `argv` as described at the top.
local function run(keys, argv)
  KEYS, ARGV = keys, argv
  stream, expiry = KEYS[1], KEYS[2]
  op, sp, lp, up = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
  lean = ARGV[5] == 'lean'
  ahead = tonumber(ARGV[6])
  argi = 6
  now, now_us = nil, nil
  meta.occurred, meta.schema, meta.tp, meta.source = '', '', '', ''
  if op == 'create' then
    local id = arg()
    local m = arg()
    local json = arg()
    local ttl = tonumber(arg())
    local tomb = tonumber(arg())
    local user = arg()
    local max = tonumber(arg())
    local event_id = arg()
    local payload = arg()
    read_meta()
    local spare = rest()
    if redis.call('EXISTS', sp .. id, lp .. id) > 0 then
      return { 'exists' }
    end
    local ended, need = evict(user, max, id, spare, tomb)
    if not ended then
      return { 'need_ids', int(need) }
    end
    local sid = append(id, 1, 'created', user, payload, event_id)
    store_live(id, m, 1, json, ttl, tomb, user, '', false, true)
    return { 'ok', sid, unpack(ended) }
  elseif op == 'write' then
    local id = arg()
    local m = arg()
    local expected = tonumber(arg())
    local json = arg()
    local ttl = tonumber(arg())
    local tomb = tonumber(arg())
    local user = arg()
    local old_user = arg()
    local kind = arg()
    local event_id = arg()
    local payload = arg()
    read_meta()
    -- 'lower': the time to live is the caller's own (see `lower`).
    local own_ttl = arg() == 'lower'
    local seq, reply, had = current(id, expected)
    if not seq then
      return reply
    end
    local sid = append(id, seq + 1, kind, user, payload, event_id)
    local ledger = store_live(id, m, seq + 1, json, ttl, tomb, user, old_user, had, false)
    if own_ttl and lean then
      lower(id, m, ttl, ledger)
    end
    return { 'ok', sid }
  elseif op == 'end' then
    -- With `expected` -1 the caller does not know the session: the user comes
    -- from a ledger at the key's version, or the reply is a conflict with the
    -- JSON so that the caller asks again knowing it.
    local id = arg()
    local m = arg()
    local expected = tonumber(arg())
    local user = arg()
    local kind = arg()
    local status = arg()
    local tomb = tonumber(arg())
    local event_id = arg()
    local payload = arg()
    read_meta()
    local json, lseq, lstatus, luser = state(id)
    if lstatus and lstatus ~= 'live' then
      return { 'ended', lstatus }
    end
    if not json then
      return { 'missing' }
    end
    local seq = version_of(json)
    if not seq then
      return redis.error_reply('session ' .. id .. ': its JSON does not end with _version')
    end
    if expected < 0 then
      if lseq ~= seq then
        return { 'conflict', json }
      end
      user = luser
    elseif seq ~= expected then
      return { 'conflict', json }
    end
    local sid = append(id, seq + 1, kind, user, payload, event_id)
    store_end(id, m, seq + 1, status, user, tomb)
    return { 'ok', sid, int(seq + 1), user }
  elseif op == 'rotate' then
    local old = arg()
    local old_m = arg()
    local expected = tonumber(arg())
    local old_user = arg()
    local new = arg()
    local new_m = arg()
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
    local seq, reply = current(old, expected)
    if not seq then
      return reply
    end
    if redis.call('EXISTS', sp .. new, lp .. new) > 0 then
      return { 'exists' }
    end
    local ended, need = evict(user, max, old, spare, tomb)
    if not ended then
      return { 'need_ids', int(need) }
    end
    local oxid = append(old, seq + 1, 'destroyed', old_user, end_payload, end_id)
    store_end(old, old_m, seq + 1, 'destroyed', old_user, tomb)
    local sid = append(new, 1, 'created', user, create_payload, create_id)
    store_live(new, new_m, 1, json, ttl, tomb, user, '', false, true)
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
      local xid = append(s[1], s[3] + 1, 'destroyed', user, payload, ids[i])
      store_end(s[1], s[2], s[3] + 1, 'destroyed', user, tomb)
      ended[#ended + 1] = s[1] .. ' ' .. int(s[3] + 1) .. ' ' .. xid
    end
    return ended
  elseif op == 'expire' then
    -- The reaper's visit of a due entry (filed under any member form, with
    -- `score`). A session still live is filed again from its key's TTL, or,
    -- within the look-ahead of its deadline, needs a look first ('look' with
    -- its JSON: the caller reads the user and calls `look`). A session whose
    -- key is gone ends with the version and user of its ledger; without a
    -- ledger nothing in Redis knows them, and the database sweep of overdue
    -- sessions writes the end.
    local id = arg()
    local m = arg()
    local score = tonumber(arg())
    local tomb = tonumber(arg())
    local event_id = arg()
    local payload = arg()
    read_meta()
    clock()
    -- The entry the reaper saw, under whichever form it has (a session an
    -- older server filed again may have two for a moment; filing it again
    -- below leaves one).
    local seen = false
    for _, w in ipairs({ emember(m), m, id }) do
      local s = redis.call('ZSCORE', expiry, w)
      if s and tonumber(s) == score then
        seen = true
        break
      end
    end
    if not seen or score > now then
      -- Filed again since the reaper looked, or not due yet.
      return { 'skip' }
    end
    local json, lseq, status, user = state(id)
    if status and status ~= 'live' then
      unfile(id, m)
      return { 'gone' }
    end
    if json then
      local pttl = redis.call('PTTL', sp .. id)
      if pttl < 0 then
        -- A key without a TTL never expires: `verify` names it.
        return { 'skip' }
      end
      local v = version_of(json)
      if lean and pttl > ahead then
        -- Not near its deadline: no look needed (one taken before a write
        -- that extended the session is dropped).
        if lseq then
          redis.call('DEL', lp .. id)
        end
        file(id, m, pttl, false, true)
        return { 'skip' }
      end
      if lseq and v == lseq then
        file(id, m, pttl, true, true)
        return { 'skip' }
      end
      return { 'look', json }
    end
    if not lseq then
      unfile(id, m)
      return { 'gone' }
    end
    -- An early entry seen after the key went: the ledger's TTL (the deadline
    -- plus the tombstone TTL) tells the deadline, which the event carries.
    local lpttl = redis.call('PTTL', lp .. id)
    if lpttl > 0 then
      local d = math.min(now, now + lpttl - tomb)
      if math.abs(d - score) > 1000 then
        file(id, m, d - now, true, true)
        return { 'skip' }
      end
    end
    local sid = append(id, lseq + 1, 'expired', user, payload, event_id)
    store_end(id, m, lseq + 1, 'expired', user, tomb)
    return { 'ok', sid, int(lseq + 1), user }
  elseif op == 'look' then
    -- Writes the look of a live session at `seq` (the reaper read its user
    -- from the JSON) and files it at its deadline, unless it changed since.
    local id = arg()
    local m = arg()
    local seq = tonumber(arg())
    local user = arg()
    local tomb = tonumber(arg())
    local json, _, status = state(id)
    if not json or (status and status ~= 'live') or version_of(json) ~= seq then
      return { 'skip' }
    end
    local pttl = redis.call('PTTL', sp .. id)
    if pttl < 0 then
      return { 'skip' }
    end
    set_ledger(id, seq, user, pttl + tomb)
    file(id, m, pttl, true, true)
    return { 'ok', '' }
  elseif op == 'restore' then
    -- Re-materialize a session from the audit database (replay, a read during
    -- recovery, the base of a projection). The one rule of ending: nothing
    -- comes back that Redis knows has ended, or knows a newer state of, and
    -- nothing past its deadline. A ledger at the same seq without its key (a
    -- key evicted or deleted by hand) is restored. A key behind the database
    -- is replaced; its user must then be given (`old_seq`, `old_user`), or the
    -- reply is 'behind' with its JSON.
    local id = arg()
    local m = arg()
    local json = arg()
    local seq = tonumber(arg())
    local user = arg()
    local deadline = tonumber(arg())
    local tomb = tonumber(arg())
    local old_seq = tonumber(arg())
    local old_user = arg()
    local cur, lseq, status, luser = state(id)
    if status and status ~= 'live' then
      return { 'ended', status, int(lseq) }
    end
    local had = lseq ~= nil
    if cur then
      local v = version_of(cur) or 0
      if v > seq then
        return { 'newer', int(v) }
      end
      if v == seq then
        return { 'current', int(v) }
      end
      if lseq == v then
        old_user = luser
      elseif old_seq ~= v then
        return { 'behind', cur }
      end
    elseif lseq then
      if lseq > seq then
        return { 'newer', int(lseq) }
      end
      old_user = luser
    else
      old_user = ''
    end
    clock()
    local remaining = deadline - now
    if remaining <= 0 then
      return { 'expired' }
    end
    redis.call('SET', sp .. id, json, 'PX', remaining)
    local ledger = had or not lean or remaining <= ahead
    if ledger then
      set_ledger(id, seq, user, remaining + tomb)
    end
    file(id, m, remaining, ledger, true)
    if user ~= '' then
      local w = member(id, m)
      redis.call('ZREM', up .. user, w == m and id or m)
      redis.call('ZADD', up .. user, 'NX', now_us, w)
    end
    if old_user ~= '' and old_user ~= user then
      unindex(up .. old_user, id, m)
    end
    return { 'ok', '' }
  elseif op == 'apply' then
    -- Projection of an event staged in the audit database while Redis was
    -- unreachable. The event keeps its id; Redis gives it its place: right
    -- after what Redis holds when that is the state the caller folded on
    -- (`base`, whose user is `old_user`), or after the end when the session
    -- has ended meanwhile (the event is logged, the session stays ended).
    -- Applied at most once: a marker per event id outlives any retry.
    local id = arg()
    local m = arg()
    local base = tonumber(arg())
    local json = arg()
    local ttl = tonumber(arg())
    local tomb = tonumber(arg())
    local user = arg()
    local old_user = arg()
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
    local cur, lseq, status, luser = state(id)
    local sid
    if status and status ~= 'live' then
      redis.call('SET', applied, '1', 'PX', tomb)
      if kind == 'destroyed' or kind == 'expired' then
        -- Already ended: an end is in the log once.
        return { 'applied' }
      end
      sid = append(id, lseq + 1, kind, luser, payload, event_id)
      redis.call('SET', lp .. id, int(lseq + 1) .. '|' .. status .. '|' .. luser, 'KEEPTTL')
      return { 'ok', sid, int(lseq + 1), 'ended' }
    end
    local have = (cur and version_of(cur)) or lseq or 0
    if have ~= base then
      if cur then
        return { 'conflict', cur }
      end
      return { 'conflict' }
    end
    if lseq and not cur then
      -- Live in the ledger but past its deadline in Redis: the caller restores
      -- it first when its deadline in the database allows.
      return { 'missing' }
    end
    sid = append(id, base + 1, kind, user, payload, event_id)
    if status_after == 'live' then
      store_live(id, m, base + 1, json, ttl, tomb, user, old_user, lseq ~= nil, base == 0)
    else
      store_end(id, m, base + 1, status_after, user, tomb)
    end
    redis.call('SET', applied, '1', 'PX', tomb)
    return { 'ok', sid, int(base + 1), status_after }
  end
  return redis.error_reply('unknown operation ' .. tostring(op))
end
