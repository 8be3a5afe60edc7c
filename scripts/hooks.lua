-- scripts/hooks.lua: the four hooks, each in the virtual user's own sandboxed Lua state.
--   on_start        makes a per-user token and keeps it in user.vars
--   before_request  sends it as a header (and tags the upload with the user id)
--   after_response  checks the body, and fails the request if the check does not hold
--   on_stop         runs once when the user stops
-- Run it against the built-in target:
--   stormlight target --port 8000 &
--   stormlight run scripts/hooks.lua --host http://127.0.0.1:8000 -u 10 -t 10s
options = { users = 10, spawn_rate = 10, duration = "10s" }

endpoints = {
  Task("GET", "/hello"),
  Task("POST", "/api/upload", { json = { name = "test", price = 10 } }),
  { method = "GET", path = "/items/7", name = "/items/[id]" },
}

function on_start(user)
  user.vars.token = string.format("user-%d-%d", user.id, math.random(1e9))
  user.vars.sent = 0
end

function before_request(user, req)
  req.headers["Authorization"] = "Bearer " .. user.vars.token
  if req.method == "POST" then
    req.json = { name = "test", price = 10, user = user.id }  -- replaces the prebuilt body
  end
  user.vars.sent = user.vars.sent + 1
end

function after_response(user, req, res)
  if res.status ~= 200 then
    return false, "status " .. res.status
  end
  if req.method == "GET" and req.path == "/hello" and not res.body:find("Hello", 1, true) then
    return false, "greeting missing from body"
  end
end

function on_stop(user)
  -- user.vars.sent requests were prepared by this user
end
