---@meta stormlight
-- The scenario API of stormlight, for the Lua language server (LuaLS, sumneko): with this file
-- in the workspace, editors complete and check scenarios. It is never run.
-- Keep it complete: a test fails when the host defines a global that is missing here.

-- ---------------------------------------------------------------------------------------------
-- What a scenario defines
-- ---------------------------------------------------------------------------------------------

---@alias stormlight.Method "GET"|"POST"|"PUT"|"PATCH"|"DELETE"|"HEAD"|"OPTIONS"|"TRACE"

---An endpoint: `Task(method, path, opts)` or a plain table with these fields.
---@class stormlight.Endpoint
---@field method stormlight.Method|string
---@field path? string Joined to the host as text.
---@field url? string An absolute http:// or https:// URL instead of `path`.
---@field headers? table<string, string> At most 1000.
---@field query? table<string, string|number|boolean>
---@field json? table Sent as JSON (Content-Type: application/json); its text at most the state's memory limit (--script-memory).
---@field body? string Sent as is.
---@field form? table<string, string|number|boolean> Sent url-encoded.
---@field name? string The row it is counted under (default: the path); cut at 200 characters.
---@field weight? integer How often a user picks it, relative to the others (default 1).
---@field timeout? number|string Seconds, or a duration like "500ms".

---The requests users pick from, by weight (optional when `scenario` is defined).
---@type stormlight.Endpoint[]
endpoints = {}

---Base URL the endpoints' paths are joined to (`--host` wins).
---@type string
host = nil

---Defaults for the command-line flags (a flag wins).
---@class stormlight.Options
---@field users? integer
---@field spawn_rate? number
---@field duration? number|string
---@field timeout? number|string
---@field grace? number|string
---@field script_timeout? number|string How long one call into the scenario may work, its waits on http and sleep not counted (default 5s).
---@field stages? { duration: number|string, users?: integer, rate?: number }[] Users (or, with `rate`, iterations per second) over time.
---@field rate? number Open model: iterations started per second.
---@field max_users? integer Open model: the pool of users (default: the rate, rounded up).

---@type stormlight.Options
options = {}

---Think time between a user's iterations: `between(a, b)`, `constant(s)`,
---`constant_pacing(s)` or `constant_throughput(n)`.
---@type stormlight.Wait
wait_time = nil

---Pass/fail criteria: "metric op value" strings ("p95 < 200ms", "fail_rate < 1%", "rps > 100",
---"checks > 99%"), tables { "…", abort_on_fail = true, delay = "10s" }, and per row
---["GET /hello"] = { "p99 < 50ms" }. Any that fails makes the exit code 1.
---@type table<integer|string, string|table>
thresholds = {}

-- ---------------------------------------------------------------------------------------------
-- Hooks (define the ones you need)
-- ---------------------------------------------------------------------------------------------

---A virtual user.
---@class stormlight.User
---@field id integer 1..N
---@field vars table Per-user state.
---@field setup any What `setup()` returned.

---The request a user is about to send (in `before_request`) or sent (in `after_response`).
---@class stormlight.Req
---@field method string
---@field path? string
---@field url? string
---@field name string
---@field headers table<string, string> Set a header with `req.headers["X-Name"] = "v"`, remove it with nil (at most 1000 in all).
---@field query table<string, string> A copy: assign a whole table to change it.
---@field body? string
---@field json? table Assign to send a new JSON body.
---@field form? table Assign to send a new url-encoded body.
---@field timeout? number

---A response.
---@class stormlight.Res
---@field status integer 0 when no response came (then `error` says why).
---@field headers table<string, string> Lower-case names.
---@field body string
---@field elapsed_ms number
---@field error? string Why no response came (requests made with `http`).
local Res = {}

---The body decoded as JSON (null becomes nil). Raises an error when the body is not JSON or
---no response came (check `status` first, or use pcall).
---@return any
function Res:json() end

---Once per user, when it starts.
---@param user stormlight.User
function on_start(user) end

---Before each request picked from `endpoints`: change `req`, or return false to skip it.
---@param user stormlight.User
---@param req stormlight.Req
---@return boolean|nil
function before_request(user, req) end

---After each response: return false, "why" to count it as a failure, true to count a
---status >= 400 as a success. Keep ids out of "why": past --max-names distinct reasons, new
---ones share one row.
---@param user stormlight.User
---@param req stormlight.Req
---@param res stormlight.Res
---@return boolean|nil, string|nil
function after_response(user, req, res) end

---Once per user, when the run stops (may still send, within the grace period).
---@param user stormlight.User
function on_stop(user) end

---Each iteration of a user, instead of picking an endpoint.
---@param user stormlight.User
function scenario(user) end

---Once, before any user starts, in a state of its own; what it returns (plain data, as JSON
---at most the state's memory limit) reaches every user as `user.setup`.
---@return any
function setup() end

---Once, after the users stop (also after Ctrl-C).
---@param setup_data any What `setup()` returned.
function teardown(setup_data) end

-- ---------------------------------------------------------------------------------------------
-- What the host gives
-- ---------------------------------------------------------------------------------------------

---An endpoint entry.
---@param method stormlight.Method|string
---@param path string
---@param opts? stormlight.Endpoint
---@return stormlight.Endpoint
function Task(method, path, opts) end

---@class stormlight.Wait

---A random pause from `a` to `b` seconds after each iteration.
---@param a number
---@param b number
---@return stormlight.Wait
function between(a, b) end

---Always the same pause.
---@param seconds number
---@return stormlight.Wait
function constant(seconds) end

---An iteration every `seconds` per user (the pause fills the rest).
---@param seconds number
---@return stormlight.Wait
function constant_pacing(seconds) end

---`n` iterations per second per user.
---@param n number
---@return stormlight.Wait
function constant_throughput(n) end

---Options of a request made with `http` (an endpoint's fields, but for method, path and url).
---@class stormlight.RequestOptions
---@field headers? table<string, string>
---@field query? table<string, string|number|boolean>
---@field json? table
---@field body? string
---@field form? table<string, string|number|boolean>
---@field name? string
---@field timeout? number|string

---Requests from Lua: each is counted under its name, like an endpoint; they wait without
---holding up other users. In hooks and `scenario`, not while the file loads.
http = {}

---@param path_or_url string
---@param opts? stormlight.RequestOptions
---@return stormlight.Res
function http.get(path_or_url, opts) end

---@param path_or_url string
---@param opts? stormlight.RequestOptions
---@return stormlight.Res
function http.post(path_or_url, opts) end

---@param path_or_url string
---@param opts? stormlight.RequestOptions
---@return stormlight.Res
function http.put(path_or_url, opts) end

---@param path_or_url string
---@param opts? stormlight.RequestOptions
---@return stormlight.Res
function http.patch(path_or_url, opts) end

---@param path_or_url string
---@param opts? stormlight.RequestOptions
---@return stormlight.Res
function http.delete(path_or_url, opts) end

---@param path_or_url string
---@param opts? stormlight.RequestOptions
---@return stormlight.Res
function http.head(path_or_url, opts) end

---@param path_or_url string
---@param opts? stormlight.RequestOptions
---@return stormlight.Res
function http.options(path_or_url, opts) end

---@param method stormlight.Method|string
---@param path_or_url string
---@param opts? stormlight.RequestOptions
---@return stormlight.Res
function http.request(method, path_or_url, opts) end

---Pauses the user (cut short when the run stops).
---@param seconds number|string
function sleep(seconds) end

---Counts a pass (value is not false or nil) or a fail under `description`. Keep it fixed: past
---the --max-names distinct descriptions, new ones count under "(checks past --max-names)".
---@param value any
---@param description string
---@return boolean passed
function check(value, description) end

---Lines on stderr, as `print` writes them: at most 100 a second across all users, each cut at
---4 KiB.
log = {}

---@param ... any
function log.info(...) end

---@param ... any
function log.warn(...) end

---@param ... any
function log.error(...) end

json = {}

---@param value any
---@return string
function json.encode(value) end

---The value is built in the user's state as the text is read (held to its memory limit).
---@param text string
---@return any
function json.decode(text) end

---A random version 4 UUID.
---@return string
function uuid() end

rand = {}

---A random integer from `a` to `b`, both included.
---@param a integer
---@param b integer
---@return integer
function rand.int(a, b) end

---A random item of a list (nil if it is empty).
---@generic T
---@param list T[]
---@return T
function rand.pick(list) end

---Rows read once from a file beside the scenario, shared by every user.
---@class stormlight.Feed
local Feed = {}

---@return integer
function Feed:len() end

---Row `i` (1-based): a table by column name (CSV) or the item (JSON). Raises an error when
---`i` is out of range.
---@param i integer
---@return table
function Feed:row(i) end

---@return table
function Feed:random() end

---The same row for a user every time; distinct users get distinct rows while there are
---rows enough.
---@param user stormlight.User
---@return table
function Feed:for_user(user) end

data = {}

---A CSV file with a header line, beside the scenario (a regular file, at most 256 MiB).
---@param file string
---@return stormlight.Feed
function data.csv(file) end

---A JSON file holding an array, beside the scenario (a regular file, at most 16 MiB).
---@param file string
---@return stormlight.Feed
function data.json(file) end
