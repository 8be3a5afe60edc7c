-- scripts/stormlight_file.lua: the scenario `stormlight demo` runs. stormlight began as a blog
-- post that rebuilt a minimal Locust in Python; this is that post's example, in Lua.
-- Two endpoints of the built-in target: GET /hello and POST /api/upload (twice as often).
-- Try it:  stormlight target --port 8000   (in one terminal)
--          stormlight run scripts/stormlight_file.lua -t 10s
host = "http://127.0.0.1:8000"               -- optional default; --host wins

options = { users = 10, spawn_rate = 2, duration = "30s" }   -- optional defaults; flags win

endpoints = {
  Task("GET", "/hello", { headers = { ["Content-Type"] = "application/json" } }),
  Task("POST", "/api/upload", { json = { name = "test", price = 10 }, weight = 2 }),
}
