-- scripts/shop.lua: a shop's customers, against the built-in target.
--   stormlight target --port 8000 &
--   stormlight run scripts/shop.lua --host http://127.0.0.1:8000 -u 10 -t 30s
-- Each user logs in as a customer of its own (from customers.csv, beside this file), keeps the
-- token the login returns and the session cookie it sets, browses with think time, and places
-- an order. `check` counts what was verified; the summary lists the checks.
options = { users = 10, spawn_rate = 5, duration = "30s" }
wait_time = between(1, 2)

local customers = data.csv("customers.csv")

function setup()
  -- Once, before any user starts: what the shop sells today.
  return { items = { 3, 7, 11, 19, 23 } }
end

function on_start(user)
  local me = customers:for_user(user)
  local login = http.post("/login", { json = { user = me.name } })
  check(login.status == 200, "login is 200")
  user.vars.me = me
  user.vars.auth = { Authorization = "Bearer " .. login:json().token }
end

function scenario(user)
  local auth = user.vars.auth
  local account = http.get("/account", { headers = auth })
  check(account.status == 200 and account:json().user == user.vars.me.name, "the session is this customer's")
  sleep(0.3)
  -- Browse: a page of items, grouped under one name.
  for _ = 1, rand.int(1, 3) do
    local id = rand.pick(user.setup.items)
    local item = http.get("/items/" .. id, { headers = auth, name = "/items/[id]" })
    check(item.status == 200 and item:json().id == id, "item page shows the item")
    sleep(0.2)
  end
  local order = http.post("/orders", {
    headers = auth,
    json = { item = rand.pick(user.setup.items), qty = rand.int(1, 3), city = user.vars.me.city },
  })
  check(order.status == 201, "order accepted")
  if order.status ~= 201 then
    log.warn(user.vars.me.name, "order failed:", order.status, order.error)
  end
end

function teardown(setup_data)
  log.info("shop closed; it sold items", json.encode(setup_data.items))
end
