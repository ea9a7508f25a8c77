//! The Lua scripts of the Streams backend: each is a step that must happen
//! atomically on the server (check-then-act on a group's pending list, or a
//! move between two keys). Times come from the server's clock (`TIME`), so
//! processes with skewed clocks agree on when a delayed retry is due.

use std::sync::LazyLock;

use ::redis::Script;

/// Lua shared by the scripts of ordered groups: `hand_on(busy, retry,
/// waitp, key)` gives a key whose holder is settled (or gone) to its next
/// waiting message, moved to the retry stream, or frees it; and
/// `held_by(holder, mid)` says whether a busy hash value names message
/// `mid` (a holder read from a topic stream also records where it is:
/// `<id>\n<stream>\n<entry id>`).
macro_rules! key_turns {
    () => {
        r#"
local function hand_on(busy, retry, waitp, key)
  local nxt = redis.call('LPOP', waitp .. key)
  if nxt then
    local waiting = cmsgpack.unpack(nxt)
    redis.call('XADD', retry, '*', 'src', waiting[1], unpack(waiting[3]))
    redis.call('HSET', busy, key, waiting[2])
  else
    redis.call('HDEL', busy, key)
  end
end
local function held_by(holder, mid)
  return holder == mid or (holder and string.sub(holder, 1, #mid + 1) == mid .. '\n')
end
"#
    };
}

/// Lua shared by scripts that compare stream entry ids: `after(a, b)`
/// says whether id `a` comes after id `b` (`<ms>-<seq>`, or `<ms>`).
macro_rules! entry_ids {
    () => {
        r#"
local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  if not dash then return tonumber(id), 0 end
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function after(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am > bm or (am == bm and as > bs)
end
"#
    };
}

/// Creates the group on the retry stream (at `0`) and on topic streams
/// (MKSTREAM), recording when the group was born so every member starts a
/// stream it discovers later at the same place, and, per topic stream,
/// the entry before the group's first one as where its turns begin
/// ([`TAKE_TURNS`]). A group made by a Sluice that kept no such record
/// gave every entry it delivered its turn as it read it, so its record
/// starts at the last entry delivered.
///
/// KEYS: groups hash, the group's stream set, retry stream, turned hash,
/// topic streams…. ARGV: group, `earliest` | `latest`. Returns the group's
/// start id.
pub static ENSURE_GROUPS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local start = redis.call('HGET', KEYS[1], ARGV[1])
local born = false
if not start then
  if ARGV[2] == 'latest' then
    local t = redis.call('TIME')
    start = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)) .. '-0'
  else
    start = '0'
  end
  redis.call('HSET', KEYS[1], ARGV[1], start)
  born = true
end
local function create(key, id)
  local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', key, ARGV[1], id, 'MKSTREAM')
  if not ok then
    local text = type(err) == 'table' and err.err or tostring(err)
    if not string.find(text, 'BUSYGROUP', 1, true) then return text end
  end
  redis.call('SADD', KEYS[2], key)
  return nil, ok
end
local failed = create(KEYS[3], '0')
if failed then return redis.error_reply(failed) end
for i = 5, #KEYS do
  -- The first member starts existing streams exactly at their end; streams
  -- found later start at the group's birth.
  local id = start
  if born and start ~= '0' then id = '$' end
  local made
  failed, made = create(KEYS[i], id)
  if failed then return redis.error_reply(failed) end
  if made or redis.call('HEXISTS', KEYS[4], KEYS[i]) == 0 then
    local first = '0-0'
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[i])) do
      local info = {}
      for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
      if info['name'] == ARGV[1] then first = info['last-delivered-id'] end
    end
    redis.call('HSET', KEYS[4], KEYS[i], first)
  end
end
return start
"#,
    )
});

/// Gives each keyed topic entry an ordered group's member has just read
/// (or claimed) its key's turn, in stream order across the group: an entry
/// whose key has no message in flight takes the key (the busy hash records
/// its message id, and where the entry is, for [`RELEASE_TRIMMED`]) and
/// is delivered; one whose key is busy joins the end of the key's waiting
/// list and is acknowledged in its stream, in the same step, so it is
/// never in any consumer's hands while it waits. Settling the message that
/// holds a key ([`SETTLE`]) moves the key's next waiting message to the
/// group's retry stream, which every member reads, and hands it the key.
/// Retry stream entries hold their key already; unkeyed entries need none.
///
/// The member reads with a plain XREADGROUP, so payloads never pass
/// through Lua; only ids and keys come here. Turns must still follow the
/// stream's order, though two members may read one after the other and
/// ask for their turns the other way round, or one may die in between.
/// So the `turned` hash keeps, per stream, the last entry that had its
/// turn, and an entry past it first gives the entries between their turns
/// (those another member read and has not asked for yet: the pending ones
/// in that stretch). An entry at or before that point had
/// its turn already: it is delivered only if the caller still holds it
/// (it took its key, or had none), not if it was put on a waiting list.
///
/// KEYS: busy hash, turned hash, topic streams…. ARGV: group, consumer,
/// waiting-list prefix, then per stream: its KEYS index, 1 if its entries
/// are one XREADGROUP's run (no other entry between them) else 0, their
/// number, and per entry (in stream order) its id, key (`` for none) and
/// message id. Returns, per entry, 1 to deliver it or 0 to drop it.
pub static TAKE_TURNS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        entry_ids!(),
        r#"
local busy, turned = KEYS[1], KEYS[2]
local group, consumer, waitp = ARGV[1], ARGV[2], ARGV[3]
local function take(stream, id, key, mid, fields)
  if key == '' then return 1 end
  local holder = mid .. '\n' .. stream .. '\n' .. id
  if redis.call('HSETNX', busy, key, holder) == 1 then return 1 end
  if redis.call('HGET', busy, key) == holder then return 1 end
  if not fields then
    local e = redis.call('XRANGE', stream, id, id)[1]
    fields = (e and e[2]) or {}
  end
  if mid == stream .. '/' .. id then
    fields[#fields + 1] = 'id'
    fields[#fields + 1] = mid
  end
  redis.call('RPUSH', waitp .. key, cmsgpack.pack({stream, mid, fields}))
  redis.call('XACK', stream, group, id)
  return 0
end
local function pending_to(stream, id)
  local ok, p = pcall(redis.call, 'XPENDING', stream, group, id, id, 1)
  if ok and #p == 1 then return p[1][2] end
  return nil
end
-- Entries another member read between the last turn and `upto`, still
-- pending (looked up in the pending list, so a long stretch the group
-- has settled costs nothing).
local function fill_gap(stream, from, upto)
  local start = '(' .. from
  repeat
    local page = redis.call('XPENDING', stream, group, start, '(' .. upto, 1000)
    for _, p in ipairs(page) do
      local e = redis.call('XRANGE', stream, p[1], p[1])[1]
      if e then
        local fields, key, mid = e[2], '', nil
        for j = 1, #fields, 2 do
          if fields[j] == 'key' then key = fields[j + 1]
          elseif fields[j] == 'id' then mid = fields[j + 1] end
        end
        take(stream, e[1], key, mid or (stream .. '/' .. e[1]), fields)
      end
    end
    if #page > 0 then start = '(' .. page[#page][1] end
  until #page < 1000
end
local out = {}
local i = 4
while i <= #ARGV do
  local stream, run, n = KEYS[tonumber(ARGV[i])], ARGV[i + 1] == '1', tonumber(ARGV[i + 2])
  i = i + 3
  local last = redis.call('HGET', turned, stream)
  local moved, previous = false, nil
  for _ = 1, n do
    local id, key, mid = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    if last and not after(id, last) then
      out[#out + 1] = (pending_to(stream, id) == consumer) and 1 or 0
    else
      if last and not (run and previous == last) then fill_gap(stream, last, id) end
      out[#out + 1] = take(stream, id, key, mid, nil)
      last, moved = id, true
    end
    previous = id
  end
  if moved then redis.call('HSET', turned, stream, last) end
end
return out
"#
    ))
});

/// Settles a batch of deliveries, each on its own and all or nothing: only
/// if this consumer still holds the entry with the delivery count it was
/// given (else its lease ran out and another consumer, or a later delivery
/// here, has it now), and only once every key it would write holds the
/// right type, so no write can fail halfway. Then, by kind:
///
/// - `a` (ack): XACK (and XDEL from the retry stream, which is the group's
///   alone);
/// - `n` (nack): the same, plus a copy (an envelope carrying the attempts
///   so far) parked in the delayed set, scored by when it is due, or put
///   straight in the retry stream for no delay;
/// - `p` (publish and ack): XADD of each output, then as an ack.
///
/// An ack or a publish-and-ack of the message that holds its key in an
/// ordered group ([`TAKE_TURNS`]) hands the key on: the key's next
/// waiting message goes to the retry stream and takes the key, or, with
/// none waiting, the key is free. A nack keeps the key for the retry.
///
/// What the consumer holds is read with one XPENDING per source stream,
/// over the range of ids the batch settles (an entry missing from a reply
/// that may have been cut short is looked up alone), and the acks go in one
/// XACK per stream at the end: the script runs whole, so nothing can see
/// the order, and a batch costs the server a few calls instead of a few per
/// delivery. An entry settled twice in one batch counts once.
///
/// KEYS: retry stream, delayed set, busy hash, then every source and
/// output stream. ARGV: group, consumer, MAXLEN (`` for none), the
/// waiting-list prefix, the number of source ranges, then per source
/// stream its KEYS index, lowest and highest id settled and the most
/// entries the consumer can hold in that range; then per delivery: kind,
/// source (KEYS index), entry id, delivery count, the message's key (``
/// for none) and id; for
/// `n` the delay ms and the envelope; for `p` the number of outputs, and
/// per output its stream (KEYS index), the number of field arguments and
/// the fields. Returns, per delivery, 1 (done), 0 (no longer this
/// consumer's: nothing changed) or why it was refused.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        key_turns!(),
        r#"
local group, consumer, maxlen, waitp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local retry, delayed, busy = KEYS[1], KEYS[2], KEYS[3]
local ordered = redis.call('EXISTS', busy) == 1
local held, complete = {}, {}
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  local source, most = KEYS[tonumber(ARGV[i])], tonumber(ARGV[i + 3])
  local mine = {}
  local ok, p = pcall(redis.call, 'XPENDING', source, group, ARGV[i + 1], ARGV[i + 2], most, consumer)
  if ok then
    for _, e in ipairs(p) do mine[e[1]] = e[4] end
  end
  held[source], complete[source] = mine, ok and #p < most
  i = i + 4
end
local function holds(source, id, count)
  local mine = held[source]
  if not mine then
    mine = {}
    held[source] = mine
  end
  local c = mine[id]
  if c == nil and not complete[source] then
    local ok, p = pcall(redis.call, 'XPENDING', source, group, id, id, 1)
    if ok and #p == 1 and p[1][2] == consumer then c = p[1][4] end
  end
  if c ~= count then return false end
  mine[id] = false
  return true
end
local fits = {}
local function refusal(key, want)
  if fits[key] then return nil end
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then
    return 'key `' .. key .. '` holds a ' .. t .. ', not a ' .. want
  end
  fits[key] = true
  return nil
end
local acks, order = {}, {}
local now
local out = {}
while i <= #ARGV do
  local kind, source, id = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]
  local count = tonumber(ARGV[i + 3])
  local key, mid = ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  local delay, parked
  local outputs = {}
  if kind == 'n' then
    delay, parked = tonumber(ARGV[i]), ARGV[i + 1]
    i = i + 2
  elseif kind == 'p' then
    local n = tonumber(ARGV[i])
    i = i + 1
    for _ = 1, n do
      local len = tonumber(ARGV[i + 1])
      outputs[#outputs + 1] = {KEYS[tonumber(ARGV[i])], i + 2, i + 1 + len}
      i = i + 2 + len
    end
  end
  local result = 1
  if not holds(source, id, count) then
    result = 0
  elseif kind == 'n' then
    if delay <= 0 then result = refusal(retry, 'stream') or 1
    else result = refusal(delayed, 'zset') or 1 end
  else
    for _, o in ipairs(outputs) do
      local why = refusal(o[1], 'stream')
      if why then result = why break end
    end
  end
  if result == 1 then
    for _, o in ipairs(outputs) do
      if maxlen ~= '' then
        redis.call('XADD', o[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, o[2], o[3]))
      else
        redis.call('XADD', o[1], '*', unpack(ARGV, o[2], o[3]))
      end
    end
    local ids = acks[source]
    if not ids then
      ids = {}
      acks[source] = ids
      order[#order + 1] = source
    end
    ids[#ids + 1] = id
    if kind == 'n' then
      if delay <= 0 then
        redis.call('XADD', retry, '*', 'm', parked)
      else
        if not now then
          local t = redis.call('TIME')
          now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        end
        redis.call('ZADD', delayed, string.format('%.0f', now + delay), parked)
      end
    elseif ordered and key ~= '' and held_by(redis.call('HGET', busy, key), mid) then
      hand_on(busy, retry, waitp, key)
    end
  end
  out[#out + 1] = result
end
for _, source in ipairs(order) do
  local ids = acks[source]
  for from = 1, #ids, 1000 do
    local to = math.min(from + 999, #ids)
    redis.call('XACK', source, group, unpack(ids, from, to))
    if source == retry then redis.call('XDEL', source, unpack(ids, from, to)) end
  end
end
return out
"#
    ))
});

/// Hands on the keys whose holders were trimmed from a topic stream
/// (`maxlen`) before they were settled: XAUTOCLAIM reports such entries
/// once, and dropping them from the pending list would otherwise leave
/// their keys busy for good.
///
/// KEYS: busy hash, retry stream. ARGV: waiting-list prefix, stream, the
/// ids of its entries that are gone. Returns keys handed on.
pub static RELEASE_TRIMMED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        key_turns!(),
        r#"
local gone = {}
for i = 3, #ARGV do gone[ARGV[2] .. '\n' .. ARGV[i]] = true end
local busy = redis.call('HGETALL', KEYS[1])
local n = 0
for j = 1, #busy, 2 do
  local at = string.find(busy[j + 1], '\n', 1, true)
  if at and gone[string.sub(busy[j + 1], at + 1)] then
    hand_on(KEYS[1], KEYS[2], ARGV[1], busy[j])
    n = n + 1
  end
end
return n
"#
    ))
});

/// Moves due delayed retries into the retry stream.
///
/// KEYS: delayed set, retry stream. ARGV: most to move.
/// Returns milliseconds until the next one is due, or -1 if none is left.
pub static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now), 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'm', m)
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return -1 end
return math.max(0, tonumber(nxt[2]) - now)
"#,
    )
});

/// Hands a closing consumer's unsettled entries back to the group: each
/// entry it still holds moves to the placeholder consumer, idle for ages so
/// any member's next XAUTOCLAIM takes it at once, with its delivery count
/// set as given. Then the consumer is removed from every stream where it
/// holds nothing more.
///
/// KEYS: streams. ARGV: group, consumer, placeholder consumer, idle ms, then
/// (KEYS index, entry id, delivery count) triples. Returns entries handed back.
pub static HAND_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = 0
for i = 5, #ARGV, 3 do
  local key = KEYS[tonumber(ARGV[i])]
  local id = ARGV[i + 1]
  local ok, p = pcall(redis.call, 'XPENDING', key, ARGV[1], id, id, 1)
  if ok and #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', key, ARGV[1], ARGV[3], 0, id, 'IDLE', ARGV[4], 'RETRYCOUNT', ARGV[i + 2], 'JUSTID')
    n = n + 1
  end
end
for _, key in ipairs(KEYS) do
  local ok, p = pcall(redis.call, 'XPENDING', key, ARGV[1], '-', '+', 1, ARGV[2])
  if ok and #p == 0 then redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2]) end
end
return n
"#,
    )
});

/// Removes consumers that hold nothing and have been idle for a while (the
/// names of crashed processes). Atomic, so a consumer that reads in between
/// cannot lose entries; one removed while alive is re-created by its next
/// read.
///
/// KEYS: streams. ARGV: group, idle ms. Returns consumers removed.
pub static TIDY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local removed = 0
for _, key in ipairs(KEYS) do
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', key, ARGV[1])
  if ok then
    for _, c in ipairs(consumers) do
      local info = {}
      for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
      if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], info['name'])
        removed = removed + 1
      end
    end
  end
end
return removed
"#,
    )
});

/// Removes an ephemeral group everywhere.
///
/// KEYS: groups hash, stream set, retry stream, delayed set, busy hash,
/// turned hash, topic streams…. ARGV: group, waiting-list prefix.
pub static DESTROY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
for i = 7, #KEYS do pcall(redis.call, 'XGROUP', 'DESTROY', KEYS[i], ARGV[1]) end
for _, key in ipairs(redis.call('HKEYS', KEYS[5])) do redis.call('DEL', ARGV[2] .. key) end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#,
    )
});
