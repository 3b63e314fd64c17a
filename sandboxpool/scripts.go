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
// {codeMissing}, {codeTaken, token, fields}, {codeFull}, {codeVetoed, i},
// {codeWaiting, i}.
const (
	codeBusy    = 0
	codeMissing = 1
	codeTaken   = 2
	codeFull    = 3
	codeVetoed  = 4
	codeWaiting = 5
)

// checkCaller is shared by the acquire and reserve scripts, and comes
// before anything else they do: the caller's checks (AcquireUnless). Their
// keys are KEYS[5] on; their arguments (Check.arg: a field of a hash, or ""
// for the key's existence; or a wait) come last in ARGV but for the exec
// id. The first check that holds ends the script: {codeVetoed, its index}
// for a veto, {codeWaiting, its index} for a wait.
const checkCaller = `
local checks = #KEYS - 4
for i = 1, checks do
	local arg, key = ARGV[#ARGV - checks - 1 + i], KEYS[4 + i]
	if string.byte(arg, 1) == 1 then
		local parts, from = {}, 2
		while true do
			local at = string.find(arg, '\1', from, true)
			if not at then parts[#parts + 1] = string.sub(arg, from); break end
			parts[#parts + 1] = string.sub(arg, from, at - 1)
			from = at + 1
		end
		if redis.call('EXISTS', key) == 1 and redis.call('HEXISTS', key, parts[1]) == 0 then
			local state, settled = redis.call('HGET', key, 'state'), false
			for j = 2, #parts do
				if parts[j] == state then settled = true end
			end
			if not settled then return {5, i} end
		end
	else
		local hit
		if arg == '' then
			hit = redis.call('EXISTS', key)
		else
			hit = redis.call('HEXISTS', key, arg)
		end
		if hit == 1 then return {4, i} end
	end
end
`

// takeLease is shared by the acquire and reserve scripts: a new fencing
// token, the lease with its TTL, and a touch of the record and index so the
// reaper does not pick a sandbox that was just in use.
//
// The last ARGV is the exec id the holder is about to run ("" for none).
// It is stored in the record's "exec" field until Release clears it, and
// the field's previous value is returned: an exec left running by a holder
// that crashed or stopped waiting (Abandon), which the new holder must let
// end before it runs a command of its own.
//
// The exec is also marked in flight, in a field "inflight:<exec id>" that
// holds when it was taken; only the Release of a holder of that same exec
// (the job's delivery that collected its result) removes the mark, so that
// a later holder of the task, who overwrites "exec", does not make the
// reaper forget that a job will come back for its exec in this sandbox,
// nor the next holder that the exec may still run. The reply's last
// element lists "exec" first, then the other marked execs but the
// holder's own.
const takeLease = `
local tok = redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[1], tok, 'PX', ARGV[1])
local prev = {redis.call('HGET', KEYS[2], 'exec') or ''}
for _, k in ipairs(redis.call('HKEYS', KEYS[2])) do
	if string.sub(k, 1, 9) == 'inflight:' then
		local id = string.sub(k, 10)
		if id ~= ARGV[#ARGV] and id ~= prev[1] then prev[#prev + 1] = id end
	end
end
if ARGV[#ARGV] ~= '' then
	redis.call('HSET', KEYS[2], 'used', ARGV[2], 'exec', ARGV[#ARGV], 'inflight:' .. ARGV[#ARGV], ARGV[2])
else
	redis.call('HSET', KEYS[2], 'used', ARGV[2])
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return {2, tok, ` + hmgetRecord + `, prev}
`

// acquireScript takes the lease of a task that has a record.
//
// KEYS: lease, record, index, fence, then the caller's checks. ARGV: lease
// TTL ms, now ms, task id, the checks' fields, exec id.
var acquireScript = redis.NewScript(checkCaller + `
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then return {0, pttl} end
if redis.call('HEXISTS', KEYS[2], 'gen') == 0 then return {1} end
` + takeLease)

// reserveScript creates a pending record (no sandbox id yet, a fixed
// idempotency key) for a task that has none, within the capacity cap, and
// takes its lease. A record created meanwhile by someone else is just
// acquired.
//
// KEYS: lease, record, index, fence, then the caller's checks. ARGV: lease
// TTL ms, now ms, task id, cap (0: none), idempotency key, then the spec:
// image, cpu, memory MiB, disk MiB, persistent (1/0), default cwd, timeout
// ms, idle timeout ms; the checks' fields, exec id.
var reserveScript = redis.NewScript(checkCaller + `
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then return {0, pttl} end
if redis.call('HEXISTS', KEYS[2], 'gen') == 0 then
	local cap = tonumber(ARGV[4])
	if cap > 0 and redis.call('ZCARD', KEYS[3]) >= cap then return {3} end
	redis.call('HSET', KEYS[2], 'sandbox_id', '', 'gen', 1, 'cwd', '', 'key', ARGV[5],
		'created', ARGV[2], 'image', ARGV[6], 'cpu', ARGV[7], 'memory_mib', ARGV[8],
		'disk_mib', ARGV[9], 'persistent', ARGV[10], 'default_cwd', ARGV[11],
		'timeout_ms', ARGV[12], 'idle_timeout_ms', ARGV[13])
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
// the in-flight exec and the holder's own in-flight mark, and frees the
// lease.
//
// KEYS: lease, record, index. ARGV: token, now ms, task id, set cwd (1/0),
// cwd, the holder's exec id.
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then
	if ARGV[4] == '1' then
		redis.call('HSET', KEYS[2], 'used', ARGV[2], 'cwd', ARGV[5])
	else
		redis.call('HSET', KEYS[2], 'used', ARGV[2])
	end
	redis.call('HDEL', KEYS[2], 'exec', 'inflight:' .. ARGV[6])
	redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
end
redis.call('DEL', KEYS[1])
return 1
`)

// yieldScript frees a lease whose holder never started its exec: the
// record's in-flight exec goes back to the previous holder's, and the
// holder's own in-flight mark goes (unless it is that same exec: a
// re-delivery that gave up, whose exec is still uncollected).
//
// KEYS: lease, record. ARGV: token, the holder's exec id, the previous
// in-flight exec id.
var yieldScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then
	if ARGV[3] ~= '' then
		redis.call('HSET', KEYS[2], 'exec', ARGV[3])
	else
		redis.call('HDEL', KEYS[2], 'exec')
	end
	if ARGV[2] ~= '' and ARGV[2] ~= ARGV[3] then
		redis.call('HDEL', KEYS[2], 'inflight:' .. ARGV[2])
	end
end
redis.call('DEL', KEYS[1])
return 1
`)

// recreateScript starts a new generation: a new idempotency key, no sandbox
// id until the create answers, the cwd back to the spec's default. It
// returns the new generation, 0 when the lease is stale.
//
// KEYS: lease, record. ARGV: token, idempotency key, cwd.
var recreateScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local gen = redis.call('HINCRBY', KEYS[2], 'gen', 1)
redis.call('HSET', KEYS[2], 'key', ARGV[2], 'sandbox_id', '', 'cwd', ARGV[3])
return gen
`)

// renewScript extends leases still held with their tokens; it returns 1
// for each renewed lease and 0 for each lost one.
//
// KEYS: leases. ARGV: lease TTL ms, then one token per lease.
var renewScript = redis.NewScript(`
local out = {}
for i = 1, #KEYS do
	if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
		redis.call('PEXPIRE', KEYS[i], ARGV[1])
		out[i] = 1
	else
		out[i] = 0
	end
end
return out
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
// KEYS: index, fence, then lease and record of each task. ARGV: lease TTL
// ms, cutoff ms, in-flight cutoff ms, then the task ids.
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
	local lease, rec = KEYS[2 * i + 1], KEYS[2 * i + 2]
	local score = redis.call('ZSCORE', KEYS[1], task)
	if not score or tonumber(score) >= cutoff then
		out[i] = {0}
	elseif redis.call('EXISTS', lease) == 1 then
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

// deleteScript removes the record, index entry and lease of each task whose
// lease is still held with the given token; it returns 1 per task removed,
// 0 per stale lease.
//
// KEYS: index, then lease and record of each task. ARGV: token and task id
// of each task.
var deleteScript = redis.NewScript(`
local out = {}
for i = 1, #ARGV / 2 do
	local lease, rec = KEYS[2 * i], KEYS[2 * i + 1]
	if redis.call('GET', lease) == ARGV[2 * i - 1] then
		redis.call('DEL', rec, lease)
		redis.call('ZREM', KEYS[1], ARGV[2 * i])
		out[i] = 1
	else
		out[i] = 0
	end
end
return out
`)
