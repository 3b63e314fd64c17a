package sandboxpool

import "github.com/redis/go-redis/v9"

// The Lua scripts below are the pool's only writers: each one checks and
// changes a task's lease, record and index entry in one atomic step and one
// round trip. Every write made on behalf of a lease first checks that the
// lease key still holds the lease's token (fencing), so a holder whose
// lease expired cannot touch a record that someone else now owns.
//
// Key layout (P = Config.Prefix):
//
//	P sandbox:<task>  hash    the task's record (fields: recordFields)
//	P lease:<task>    string  the fencing token of the lease, with a TTL
//	P sandboxes       zset    task id → last use (unix ms); its size is the
//	                          live count the capacity cap checks
//	P fence           string  counter handing out fencing tokens
//	P gone:<task>     hash    tombstone of the task's last sandbox (id, cwd,
//	                          persistent) after a terminate or a reap, with a
//	                          TTL (Config.TombstoneTTL)
//	P inflight        zset    task id → when its lease lapses unless renewed
//	                          (unix ms), for tasks with an exec in flight:
//	                          where rescuers look for dead holders
//	P tasks           zset    task id → 0, for every record: the fan-out
//	                          index (Match reads a glob's literal prefix
//	                          with ZRANGE BYLEX); written with the record
//	                          by reserveScript and deleteScript
//
// The scripts touch keys of several tasks and the shared index, so the pool
// needs a single Redis (or a replicated primary), not a Redis Cluster.

// Record hash fields, in the order hmgetRecord returns them.
const (
	fSandboxID = iota
	fGen
	fCwd
	fKey
	fCreated
	fUsed
	fImage
	fCPU
	fMemoryMiB
	fDiskMiB
	fPersistent
	fDefaultCwd
	fTimeoutMs
	fIdleTimeoutMs
	numFields
)

// recordFields names the hash fields, indexed by the f* constants.
var recordFields = [numFields]string{
	"sandbox_id", "gen", "cwd", "key", "created", "used",
	"image", "cpu", "memory_mib", "disk_mib", "persistent", "default_cwd",
	"timeout_ms", "idle_timeout_ms",
}

const hmgetRecord = `redis.call('HMGET', KEYS[2], 'sandbox_id', 'gen', 'cwd', 'key', 'created', 'used',
	'image', 'cpu', 'memory_mib', 'disk_mib', 'persistent', 'default_cwd', 'timeout_ms', 'idle_timeout_ms')`

// Replies of acquireScript and reserveScript: {codeBusy, pttl},
// {codeMissing}, {codeTaken, token, fields, prev execs, stamp}, {codeFull},
// {codeVetoed, i}.
const (
	codeBusy    = 0
	codeMissing = 1
	codeTaken   = 2
	codeFull    = 3
	codeVetoed  = 4
)

// The acquire and reserve scripts share one layout, so that their common
// parts can be shared too.
//
// KEYS: 1 lease, 2 record, 3 idle index, 4 fence, 5 in-flight index, 6 the
// caller's stamp hash (the record again when there is none), 7 the task's
// tombstone, 8 the fan-out index, then the caller's checks.
// ARGV: 1 lease TTL ms, 2 now ms, 3 task id, 4 exec id ("" none), 5 note,
// 6 stamp ("1" or ""), then one argument per check; reserve's own arguments
// follow.
const (
	takeKeys = 8
	takeArgs = 6
)

// checkCaller comes before anything else the take scripts do: the caller's
// checks (Intent.Unless), in order. The first that holds ends the script
// with {codeVetoed, its index}. A check's argument (Check.arg) is "" for
// "the key exists", a field name for "the field is set", or "\2field\2value"
// for "the field is set to something other than value".
const checkCaller = `
local checks = #KEYS - 8
for i = 1, checks do
	local arg, key = ARGV[6 + i], KEYS[8 + i]
	local hit = 0
	if arg == '' then
		hit = redis.call('EXISTS', key)
	elseif string.byte(arg, 1) == 2 then
		local sep = string.find(arg, '\2', 2, true)
		local v = redis.call('HGET', key, string.sub(arg, 2, sep - 1))
		if v and v ~= string.sub(arg, sep + 1) then hit = 1 end
	else
		hit = redis.call('HEXISTS', key, arg)
	end
	if hit == 1 then return {4, i} end
end
`

// takeLease is shared by the acquire and reserve scripts: a new fencing
// token, the lease with its TTL (the token is also kept in the record's
// "tok", so that a holder whose lease lapsed with nobody taking it since can
// take it back: renewScript, releaseScript), and a touch of the record and
// idle index so the reaper does not pick a sandbox that was just in use.
//
// The exec the holder is about to run is stored in the record's "exec"
// field until Release clears it, and the field's previous value is
// returned: an exec left running by a holder that crashed or stopped
// waiting (Abandon), which the new holder must let end before it runs a
// command of its own.
//
// The exec is also marked in flight, in a field "inflight:<exec id>" that
// holds when it was taken, next to "note:<exec id>", the caller's note of
// what a rescuer needs to finish the exec's job; only the Release of a
// holder of that same exec (the job's delivery, or the rescuer, that
// collected its result) removes them. With a note, the task enters the
// in-flight index,
// scored by when its lease lapses unless renewed: that is where rescuers
// look for holders that died (ClaimOrphans). The reply lists "exec" first,
// then the other marked execs but the holder's own.
//
// With a stamp, the caller's hash (a job's asynq task hash) records the
// token (boxq_owner: the job's results are fenced by it) and the
// idempotency key of the sandbox the exec will start in (boxq_start); the
// previous boxq_start is returned, "" when the job never got this far. A
// hash that is gone is not recreated.
const takeLease = `
local tok = redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[1], tok, 'PX', ARGV[1])
local exec = ARGV[4]

local prev = {redis.call('HGET', KEYS[2], 'exec') or ''}
for _, k in ipairs(redis.call('HKEYS', KEYS[2])) do
	if string.sub(k, 1, 9) == 'inflight:' then
		local id = string.sub(k, 10)
		if id ~= exec and id ~= prev[1] then prev[#prev + 1] = id end
	end
end
if exec ~= '' then
	-- Armed: the holder goes straight to starting the exec (its sandbox
	-- exists, no earlier exec to wait for). Otherwise it arms the note
	-- itself (Pool.Arm) once it is about to start: a rescuer must not
	-- answer for a command that never started.
	local armed = '0'
	if (redis.call('HGET', KEYS[2], 'sandbox_id') or '') ~= '' and #prev == 1 and (prev[1] == '' or prev[1] == exec) then armed = '1' end
	redis.call('HSET', KEYS[2], 'used', ARGV[2], 'tok', tok, 'exec', exec, 'inflight:' .. exec, ARGV[2], 'armed:' .. exec, armed)
	if ARGV[5] ~= '' then
		redis.call('HSET', KEYS[2], 'note:' .. exec, ARGV[5])
		redis.call('ZADD', KEYS[5], tonumber(ARGV[2]) + tonumber(ARGV[1]), ARGV[3])
	end
else
	redis.call('HSET', KEYS[2], 'used', ARGV[2], 'tok', tok)
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
local stamp = ''
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[6]) == 1 then
	stamp = redis.call('HGET', KEYS[6], 'boxq_start') or ''
	redis.call('HSET', KEYS[6], 'boxq_owner', tok, 'boxq_start', redis.call('HGET', KEYS[2], 'key') or '')
end
return {2, tok, ` + hmgetRecord + `, prev, stamp, replaced}
`

// acquireScript takes the lease of a task that has a record.
var acquireScript = redis.NewScript(checkCaller + `
local replaced = ''
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then return {0, pttl} end
if redis.call('HEXISTS', KEYS[2], 'gen') == 0 then return {1} end
` + takeLease)

// reserveScript creates a pending record (no sandbox id yet, a fixed
// idempotency key) for a task that has none, within the capacity cap, and
// takes its lease. A record created meanwhile by someone else is just
// acquired.
//
// Its own ARGV, after the checks' (r = 6 + number of checks): r+1 cap (0:
// none), r+2 idempotency key, then the spec: image, cpu, memory MiB, disk
// MiB, persistent (1/0), default cwd, timeout ms, idle timeout ms.
//
// A tombstone (the task's last sandbox ended by a terminate or a reap)
// makes the new record a replacement: the reply's last element is the
// sandbox it replaces, and a persistent task, whose files the new sandbox
// gets back from the snapshot, gets its cwd back too.
var reserveScript = redis.NewScript(checkCaller + `
local replaced = ''
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then return {0, pttl} end
if redis.call('HEXISTS', KEYS[2], 'gen') == 0 then
	local r = #KEYS - 2
	local cap = tonumber(ARGV[r + 1])
	if cap > 0 and redis.call('ZCARD', KEYS[3]) >= cap then return {3} end
	local cwd = ''
	local tomb = redis.call('HMGET', KEYS[7], 'sandbox_id', 'cwd', 'persistent')
	if tomb[1] then
		replaced = tomb[1]
		if tomb[3] == '1' and ARGV[r + 7] == '1' then cwd = tomb[2] or '' end
		redis.call('DEL', KEYS[7])
	end
	redis.call('HSET', KEYS[2], 'sandbox_id', '', 'gen', 1, 'cwd', cwd, 'key', ARGV[r + 2],
		'created', ARGV[2], 'image', ARGV[r + 3], 'cpu', ARGV[r + 4], 'memory_mib', ARGV[r + 5],
		'disk_mib', ARGV[r + 6], 'persistent', ARGV[r + 7], 'default_cwd', ARGV[r + 8],
		'timeout_ms', ARGV[r + 9], 'idle_timeout_ms', ARGV[r + 10])
	redis.call('ZADD', KEYS[8], 0, ARGV[3])
end
` + takeLease)

// commitScript records the sandbox id a create returned.
//
// KEYS: lease, record, index. ARGV: token, sandbox id, now ms, task id.
var commitScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'sandbox_id', ARGV[2], 'created', ARGV[3], 'used', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
`)

// releaseScript stores the cwd (when ARGV[4] is 1) and the last use, clears
// the in-flight exec and the holder's own in-flight mark and note, and
// frees the lease. The task leaves the in-flight index when no noted mark
// is left; a noted mark left by another holder is due for rescue at once.
//
// A lease that lapsed (its holder stalled, or Redis was away for longer
// than the TTL) with nobody taking it since, which the record's "tok"
// tells, still counts as held: nobody else can have written meanwhile.
//
// KEYS: lease, record, idle index, in-flight index. ARGV: token, now ms,
// task id, set cwd (1/0), cwd, the holder's exec id.
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
	if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HGET', KEYS[2], 'tok') ~= ARGV[1] then return 0 end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
	if ARGV[4] == '1' then
		redis.call('HSET', KEYS[2], 'used', ARGV[2], 'cwd', ARGV[5])
	else
		redis.call('HSET', KEYS[2], 'used', ARGV[2])
	end
	redis.call('HDEL', KEYS[2], 'exec', 'inflight:' .. ARGV[6], 'note:' .. ARGV[6], 'armed:' .. ARGV[6])
	redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
	local left = false
	for _, k in ipairs(redis.call('HKEYS', KEYS[2])) do
		if string.sub(k, 1, 5) == 'note:' and redis.call('HEXISTS', KEYS[2], 'inflight:' .. string.sub(k, 6)) == 1 then left = true; break end
	end
	if left then
		redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
	else
		redis.call('ZREM', KEYS[4], ARGV[3])
	end
else
	redis.call('ZREM', KEYS[4], ARGV[3])
end
redis.call('DEL', KEYS[1])
return 1
`)

// yieldScript frees a lease whose holder never started its exec: the
// record's in-flight exec goes back to the previous holder's, and the
// holder's own in-flight mark and note go (unless it is that same exec: a
// re-delivery that gave up, whose exec is still uncollected). The task
// leaves the in-flight index when no mark is left.
//
// KEYS: lease, record, in-flight index. ARGV: token, the holder's exec id,
// the previous in-flight exec id, task id.
var yieldScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
	if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HGET', KEYS[2], 'tok') ~= ARGV[1] then return 0 end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
	if ARGV[3] ~= '' then
		redis.call('HSET', KEYS[2], 'exec', ARGV[3])
	else
		redis.call('HDEL', KEYS[2], 'exec')
	end
	if ARGV[2] ~= '' and ARGV[2] ~= ARGV[3] then
		redis.call('HDEL', KEYS[2], 'inflight:' .. ARGV[2], 'note:' .. ARGV[2], 'armed:' .. ARGV[2])
	end
	local left = false
	for _, k in ipairs(redis.call('HKEYS', KEYS[2])) do
		if string.sub(k, 1, 5) == 'note:' and redis.call('HEXISTS', KEYS[2], 'inflight:' .. string.sub(k, 6)) == 1 then left = true; break end
	end
	if not left then redis.call('ZREM', KEYS[3], ARGV[4]) end
end
redis.call('DEL', KEYS[1])
return 1
`)

// recreateScript starts a new generation: a new idempotency key, no sandbox
// id until the create answers, the given cwd, a new lifetime. It returns
// the new generation, 0 when the lease is stale.
//
// With a stamp (Intent.Stamp) still owned by the token, the stamp's
// boxq_start moves to the new key in the same step: the command was not
// started in the sandbox that is gone, and will be in the new one.
//
// The holder's exec is disarmed: it arms it again right before it starts
// it in the new sandbox (Pool.Arm), so that a rescuer that finds it dead
// meanwhile leaves the job to asynq rather than answer for it.
//
// KEYS: lease, record, stamp (the record again when none). ARGV: token,
// idempotency key, cwd, now ms, stamp ("1" or ""), the holder's exec id.
var recreateScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local gen = redis.call('HINCRBY', KEYS[2], 'gen', 1)
redis.call('HSET', KEYS[2], 'key', ARGV[2], 'sandbox_id', '', 'cwd', ARGV[3], 'created', ARGV[4])
if ARGV[5] == '1' and redis.call('HGET', KEYS[3], 'boxq_owner') == ARGV[1] then
	redis.call('HSET', KEYS[3], 'boxq_start', ARGV[2])
end
if ARGV[6] ~= '' and redis.call('HEXISTS', KEYS[2], 'inflight:' .. ARGV[6]) == 1 then
	redis.call('HSET', KEYS[2], 'armed:' .. ARGV[6], '0')
end
return gen
`)

// renewScript extends leases still held with their tokens, and takes back
// a lease that lapsed when nobody took it since (the record's "tok" is
// still the holder's: a stall or a Redis outage longer than the TTL, with no
// harm done); it returns 1 for each lease renewed and 0 for each one lost
// to another holder. A renewed task in the in-flight index moves its
// rescue time on.
//
// KEYS: the in-flight index, then lease and record of each lease. ARGV:
// lease TTL ms, now ms, then token and task id of each lease.
var renewScript = redis.NewScript(`
local out = {}
local due = tonumber(ARGV[2]) + tonumber(ARGV[1])
for i = 1, (#KEYS - 1) / 2 do
	local lease, rec, tok, task = KEYS[2 * i], KEYS[2 * i + 1], ARGV[2 * i + 1], ARGV[2 * i + 2]
	local v = redis.call('GET', lease)
	out[i] = 0
	if v == tok then
		redis.call('PEXPIRE', lease, ARGV[1])
		out[i] = 1
	elseif not v and redis.call('HGET', rec, 'tok') == tok then
		redis.call('SET', lease, tok, 'PX', ARGV[1])
		out[i] = 1
	end
	if out[i] == 1 then redis.call('ZADD', KEYS[1], 'XX', due, task) end
end
return out
`)

// armScript marks a holder's in-flight exec as about to start (Pool.Arm),
// if the holder still has the task (fenced by the record's "tok").
//
// KEYS: record. ARGV: token, exec id.
var armScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'inflight:' .. ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'armed:' .. ARGV[2], '1')
return 1
`)

// unlockScript frees leases still held with their tokens, changing nothing
// else (a failed terminate must not look like a use).
//
// KEYS: leases. ARGV: one token per lease.
var unlockScript = redis.NewScript(`
for i = 1, #KEYS do
	if redis.call('GET', KEYS[i]) == ARGV[i] then redis.call('DEL', KEYS[i]) end
end
return 1
`)

// claimScript is the reaper's: for each task still expired (last use before
// the cutoff) and free, it takes the lease. A task whose sandbox holds an
// exec marked in flight since the in-flight cutoff or later counts as busy:
// its job will come back to collect it there. So does a pending record (a
// create that failed: no sandbox id) used since the in-flight cutoff: its
// create may have made a sandbox whose answer was lost, which only a create
// with the record's idempotency key finds again, and the task's job comes
// back to make it; past the cutoff, longer than the gateway's idle timeout,
// such a sandbox has ended on its own. Replies per task: {0} no
// longer expired or no record (a stale index entry is dropped), {1} busy,
// {2, token, sandbox id, persistent}.
//
// A task in the in-flight index (an exec with a rescue note, whatever its
// age: a command may run for hours) is busy too: its holder renews it, or a
// rescuer will collect it.
//
// KEYS: index, fence, in-flight index, then lease and record of each task.
// ARGV: lease TTL ms, cutoff ms, in-flight cutoff ms, then the task ids.
var claimScript = redis.NewScript(`
local out = {}
local cutoff = tonumber(ARGV[2])
local inflightCutoff = tonumber(ARGV[3])
local function inflight(rec)
	local f = redis.call('HGETALL', rec)
	for j = 1, #f, 2 do
		if string.sub(f[j], 1, 9) == 'inflight:' and tonumber(f[j + 1]) >= inflightCutoff then
			return true
		end
	end
	return false
end
for i = 1, #ARGV - 3 do
	local task = ARGV[i + 3]
	local lease, rec = KEYS[2 * i + 2], KEYS[2 * i + 3]
	local score = redis.call('ZSCORE', KEYS[1], task)
	if not score or tonumber(score) >= cutoff then
		out[i] = {0}
	elseif redis.call('EXISTS', lease) == 1 or redis.call('ZSCORE', KEYS[3], task) then
		out[i] = {1}
	elseif redis.call('EXISTS', rec) == 0 then
		redis.call('ZREM', KEYS[1], task)
		out[i] = {0}
	elseif inflight(rec) then
		out[i] = {1}
	elseif tonumber(score) >= inflightCutoff and (redis.call('HGET', rec, 'sandbox_id') or '') == '' then
		out[i] = {1}
	else
		local tok = redis.call('INCR', KEYS[2])
		redis.call('SET', lease, tok, 'PX', ARGV[1])
		local r = redis.call('HMGET', rec, 'sandbox_id', 'persistent')
		out[i] = {2, tok, r[1] or '', r[2] or '0'}
	end
end
return out
`)

// orphanScript is the rescuer's claim: for each task whose lease lapsed
// (ClaimOrphans read it from the in-flight index, due), it takes the lease
// when it is free and the record holds an exec in flight with a note, and
// returns the record's sandbox, its key, the tracked cwd and the noted
// execs. Replies per task: {0} nothing to rescue (the task leaves the
// index), {1} busy (its holder lives: checked again a TTL later), {2,
// token, sandbox id, key, cwd, default cwd, then exec id, note, armed
// (1/0) of each noted exec}.
//
// KEYS: in-flight index, fence, then lease and record of each task. ARGV:
// lease TTL ms, now ms, then the task ids.
var orphanScript = redis.NewScript(`
local out = {}
local due = tonumber(ARGV[2]) + tonumber(ARGV[1])
for i = 1, #ARGV - 2 do
	local task = ARGV[i + 2]
	local lease, rec = KEYS[2 * i + 1], KEYS[2 * i + 2]
	if redis.call('EXISTS', lease) == 1 then
		redis.call('ZADD', KEYS[1], 'XX', due, task)
		out[i] = {1}
	else
		local f = redis.call('HGETALL', rec)
		local h = {}
		for j = 1, #f, 2 do h[f[j]] = f[j + 1] end
		local r = {2, 0, h['sandbox_id'] or '', h['key'] or '', h['cwd'] or '', h['default_cwd'] or ''}
		for k, v in pairs(h) do
			if string.sub(k, 1, 5) == 'note:' and h['inflight:' .. string.sub(k, 6)] and v ~= '' then
				r[#r + 1] = string.sub(k, 6)
				r[#r + 1] = v
				r[#r + 1] = h['armed:' .. string.sub(k, 6)] or '1'
			end
		end
		if #r == 6 then
			redis.call('ZREM', KEYS[1], task)
			out[i] = {0}
		else
			local tok = redis.call('INCR', KEYS[2])
			redis.call('SET', lease, tok, 'PX', ARGV[1])
			redis.call('HSET', rec, 'tok', tok)
			redis.call('ZADD', KEYS[1], due, task)
			r[2] = tok
			out[i] = r
		end
	end
end
return out
`)

// deleteScript removes the record, index entry and lease of each task whose
// lease is still held with the given token, and leaves a tombstone of its
// sandbox (id, cwd, persistent) for the task's next sandbox to say it is a
// replacement (reserveScript), when there was one; it returns 1 per task
// removed, 0 per stale lease.
//
// KEYS: index, fan-out index, then lease, record and tombstone of each
// task. ARGV: tombstone TTL ms, then token and task id of each task.
var deleteScript = redis.NewScript(`
local out = {}
for i = 1, (#ARGV - 1) / 2 do
	local lease, rec, tomb = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
	if redis.call('GET', lease) == ARGV[2 * i] then
		local r = redis.call('HMGET', rec, 'sandbox_id', 'cwd', 'persistent')
		if r[1] and r[1] ~= '' then
			redis.call('HSET', tomb, 'sandbox_id', r[1], 'cwd', r[2] or '', 'persistent', r[3] or '0')
			redis.call('PEXPIRE', tomb, ARGV[1])
		end
		redis.call('DEL', rec, lease)
		redis.call('ZREM', KEYS[1], ARGV[2 * i + 1])
		redis.call('ZREM', KEYS[2], ARGV[2 * i + 1])
		out[i] = 1
	else
		out[i] = 0
	end
end
return out
`)
