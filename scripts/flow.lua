-- scripts/flow.lua: a multi-step user written as Lua, against the built-in target.
--   stormlight target --port 8000 &
--   stormlight run scripts/flow.lua --host http://127.0.0.1:8000 -u 10 -t 20s
-- Each iteration of a user runs scenario(user): the requests it makes are counted under their
-- names, like endpoints, and the checks are listed under the summary.
options = { users = 10, spawn_rate = 5, duration = "20s" }
wait_time = between(0.5, 1.5)

function on_start(user)
  -- "Log in" once: the upload endpoint echoes what it gets, so the reply carries our token.
  local r = http.post("/api/upload", { json = { user = user.id, token = uuid() }, name = "login" })
  check(r.status == 200, "login is 200")
  user.vars.token = r:json().received.token
end

function scenario(user)
  local auth = { Authorization = "Bearer " .. user.vars.token }
  local home = http.get("/hello", { headers = auth })
  check(home.status == 200, "home is 200")
  sleep(0.2)
  -- Browse a few items; the name groups /items/1, /items/2, ... in one row.
  for _ = 1, rand.int(1, 3) do
    local item = http.get("/items/" .. rand.int(1, 50), { headers = auth, name = "/items/[id]" })
    check(item.status == 200 and item:json().id ~= nil, "item has an id")
  end
  local order = http.post("/api/upload", {
    headers = auth,
    json = { item = rand.int(1, 50), qty = rand.pick({ 1, 2, 5 }) },
    name = "order",
  })
  check(order.status == 200, "order accepted")
  if order.status ~= 200 then
    log.warn("user", user.id, "order failed:", order.status, order.error)
  end
end
