-- The `/v1/ws` protocol (docs/websocket-api.md) over one connection: numbered requests, `done` /
-- `error` routed back to their callbacks, `cancel`, and a connection that comes back by itself
-- (exponential back-off; at once when a request needs it). A refused key (HTTP 401) is not
-- retried until the settings change: it cannot succeed.

local ws = require("domino.ws")

local M = {}
local Client = {}
Client.__index = Client

--- opts: url, api_key (string, function returning one, or nil), initial_backoff_ms, max_backoff_ms,
--- on_state(state, detail) with state connecting | connected | disconnected | unauthorized.
function M.new(opts)
  return setmetatable({
    opts = opts, state = "disconnected", detail = "", pending = {}, next_id = 0,
    backoff = opts.initial_backoff_ms, conn = nil, timer = nil,
  }, Client)
end

function Client:set_state(state, detail)
  self.state, self.detail = state, detail
  if self.opts.on_state then self.opts.on_state(state, detail) end
end

function Client:api_key()
  local k = self.opts.api_key
  if type(k) == "function" then k = k() end
  return k ~= "" and k or nil
end

function Client:fail_pending(code, message)
  local pending = self.pending
  self.pending = {}
  for _, cb in pairs(pending) do
    cb({ code = code, message = message })
  end
end

function Client:retry_later(detail)
  self:set_state("disconnected", detail)
  if self.stopped then return end
  if self.timer then self.timer:stop() end
  self.timer = vim.defer_fn(function()
    self.timer = nil
    self:connect()
  end, self.backoff)
  self.backoff = math.min(self.backoff * 2, self.opts.max_backoff_ms)
end

function Client:connect()
  if self.conn or self.stopped then return end
  if self.timer then
    self.timer:stop()
    self.timer = nil
  end
  self:set_state("connecting", self.opts.url)
  local key = self:api_key()
  local conn
  conn = ws.connect(self.opts.url, key and { Authorization = "Bearer " .. key } or {}, {
    on_open = function()
      if self.conn ~= conn then return end
      self.backoff = self.opts.initial_backoff_ms
      self:set_state("connected", self.opts.url)
    end,
    on_message = function(text)
      if self.conn == conn then self:on_message(text) end
    end,
    on_close = function(reason)
      if self.conn ~= conn then return end
      self.conn = nil
      self:fail_pending("disconnected", "the connection to the server was lost")
      self:retry_later(reason)
    end,
    on_refused = function(status, line)
      if self.conn ~= conn then return end
      self.conn = nil
      if status == 401 then
        self:set_state("unauthorized", "the server refused the API key (HTTP 401)")
      else
        self:retry_later("the server refused the connection: " .. line)
      end
    end,
  })
  self.conn = conn
end

function Client:on_message(text)
  local ok, m = pcall(vim.json.decode, text)
  if not ok or type(m) ~= "table" or type(m.id) ~= "string" then return end
  local cb = self.pending[m.id]
  if not cb then return end -- deltas: the ghost text is shown whole, at `done`
  if m.type == "done" then
    self.pending[m.id] = nil
    cb(nil, m)
  elseif m.type == "error" then
    self.pending[m.id] = nil
    cb({ code = m.code, message = m.message })
  end
end

--- Send a `complete` (req: the message fields less type/id); cb(err, done) once. Returns the id,
--- or nil and calls cb with not_connected / unauthorized when there is no connection (a request
--- then starts a reconnect at once, for the next keystroke).
function Client:complete(req, cb)
  if self.state ~= "connected" then
    if self.state == "disconnected" then self:connect() end
    cb({ code = self.state == "unauthorized" and "unauthorized" or "not_connected", message = self.detail })
    return nil
  end
  self.next_id = self.next_id + 1
  local id = "n" .. self.next_id
  req.type, req.id = "complete", id
  self.pending[id] = cb
  self.conn:send(vim.json.encode(req))
  return id
end

--- Stop request `id` (its callback still gets the `done`, with finish_reason "cancelled").
function Client:cancel(id)
  if id and self.pending[id] and self.conn then
    self.conn:send(vim.json.encode({ type = "cancel", id = id }))
  end
end

--- Close and connect again (new URL or key); clears an `unauthorized` state.
function Client:reconnect()
  local conn = self.conn
  self.conn = nil
  if conn then
    self:fail_pending("disconnected", "reconnecting")
    conn:close()
  end
  self.backoff = self.opts.initial_backoff_ms
  self:connect()
end

function Client:stop()
  self.stopped = true
  if self.timer then self.timer:stop() end
  if self.conn then
    local conn = self.conn
    self.conn = nil
    conn:close()
  end
end

return M
