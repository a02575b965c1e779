-- A WebSocket client (RFC 6455) on Neovim's libuv TCP handles: text frames, ping/pong, close.
-- Plain ws:// only (TLS is not reachable from Lua here); reach a remote server through an SSH
-- tunnel or a local TLS-terminating proxy. Needs LuaJIT's `bit` (every Debian/Ubuntu Neovim has it).

local bit = require("bit")
local uv = vim.loop

local M = {}

-- ---- SHA-1 and base64: the handshake's Sec-WebSocket-Accept check --------------------------------
local function u32(x)
  return bit.band(x, 0xffffffff) % 0x100000000
end

local function be32(n)
  return string.char(bit.band(bit.rshift(n, 24), 255), bit.band(bit.rshift(n, 16), 255),
    bit.band(bit.rshift(n, 8), 255), bit.band(n, 255))
end

function M.sha1(msg)
  local h0, h1, h2, h3, h4 = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0
  local bits = #msg * 8
  msg = msg .. "\128" .. string.rep("\0", (55 - #msg) % 64) .. be32(math.floor(bits / 0x100000000)) .. be32(bits % 0x100000000)
  local w = {}
  for chunk = 1, #msg, 64 do
    for i = 0, 15 do
      local a, b, c, d = msg:byte(chunk + i * 4, chunk + i * 4 + 3)
      w[i] = bit.bor(bit.lshift(a, 24), bit.lshift(b, 16), bit.lshift(c, 8), d)
    end
    for i = 16, 79 do
      w[i] = bit.rol(bit.bxor(w[i - 3], w[i - 8], w[i - 14], w[i - 16]), 1)
    end
    local a, b, c, d, e = h0, h1, h2, h3, h4
    for i = 0, 79 do
      local f, k
      if i < 20 then
        f, k = bit.bor(bit.band(b, c), bit.band(bit.bnot(b), d)), 0x5A827999
      elseif i < 40 then
        f, k = bit.bxor(b, c, d), 0x6ED9EBA1
      elseif i < 60 then
        f, k = bit.bor(bit.band(b, c), bit.band(b, d), bit.band(c, d)), 0x8F1BBCDC
      else
        f, k = bit.bxor(b, c, d), 0xCA62C1D6
      end
      local t = u32(bit.rol(a, 5) + u32(f) + u32(e) + k + u32(w[i]))
      a, b, c, d, e = t, a, bit.rol(b, 30), c, d
    end
    h0, h1, h2, h3, h4 = u32(h0 + u32(a)), u32(h1 + u32(b)), u32(h2 + u32(c)), u32(h3 + u32(d)), u32(h4 + u32(e))
  end
  return be32(h0) .. be32(h1) .. be32(h2) .. be32(h3) .. be32(h4)
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

function M.base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local chars = {}
    for j = 3, 0, -1 do
      local idx = math.floor(n / 64 ^ j) % 64
      chars[#chars + 1] = B64:sub(idx + 1, idx + 1)
    end
    if not b then chars[3], chars[4] = "=", "=" elseif not c then chars[4] = "=" end
    out[#out + 1] = table.concat(chars)
  end
  return table.concat(out)
end

-- ---- framing ------------------------------------------------------------------------------------
local function random_bytes(n)
  local t = {}
  for i = 1, n do
    t[i] = string.char(math.random(0, 255))
  end
  return table.concat(t)
end

-- A client frame: FIN set, masked (clients must mask every frame).
local function frame(opcode, payload)
  local n = #payload
  local head
  if n < 126 then
    head = string.char(0x80 + opcode, 0x80 + n)
  elseif n < 65536 then
    head = string.char(0x80 + opcode, 0x80 + 126, math.floor(n / 256), n % 256)
  else
    head = string.char(0x80 + opcode, 0x80 + 127) .. be32(math.floor(n / 0x100000000)) .. be32(n % 0x100000000)
  end
  local key = random_bytes(4)
  local k = { key:byte(1, 4) }
  local out = {}
  for i = 1, n, 4096 do
    local bytes = { payload:byte(i, math.min(i + 4095, n)) }
    for j = 1, #bytes do
      bytes[j] = bit.bxor(bytes[j], k[(i + j - 2) % 4 + 1])
    end
    out[#out + 1] = string.char(unpack(bytes))
  end
  return head .. key .. table.concat(out)
end

-- Parse one server frame at the start of `buf`: fin, opcode, payload, rest; nil when incomplete,
-- "bad" when it is not a valid server frame.
local function parse_frame(buf)
  if #buf < 2 then return nil end
  local b1, b2 = buf:byte(1, 2)
  local fin, opcode = bit.band(b1, 0x80) ~= 0, bit.band(b1, 0x0f)
  local masked, n, pos = bit.band(b2, 0x80) ~= 0, bit.band(b2, 0x7f), 3
  if n == 126 then
    if #buf < 4 then return nil end
    local x, y = buf:byte(3, 4)
    n, pos = x * 256 + y, 5
  elseif n == 127 then
    if #buf < 10 then return nil end
    n = 0
    for i = 3, 10 do
      n = n * 256 + buf:byte(i)
    end
    pos = 11
  end
  if masked then return "bad" end -- a server must not mask its frames (RFC 6455 5.1)
  if #buf < pos + n - 1 then return nil end
  local payload = buf:sub(pos, pos + n - 1)
  return fin, opcode, payload, buf:sub(pos + n)
end

-- ---- connection ---------------------------------------------------------------------------------
local function parse_url(url)
  local host, port, path = url:match("^ws://%[?([^%]/]+)%]?:(%d+)(/?.*)$")
  if not host then
    host, path = url:match("^ws://([^:/]+)(/?.*)$")
    port = 80
  end
  if not host then return nil end
  return host, tonumber(port), path ~= "" and path or "/"
end

--- Connect to `url` (ws://host:port/path). `handlers`: on_open(), on_message(text),
--- on_close(reason) and on_refused(status, reason) (the handshake got no 101: 401 = wrong key).
--- Handlers run on the main loop (vim.schedule), so they may call any API. Returns a connection
--- with :send(text) and :close().
function M.connect(url, headers, handlers)
  local conn = { open = false, closed = false }
  local tcp = uv.new_tcp()
  local function emit(name, ...)
    local args = { ... }
    local n = select("#", ...)
    vim.schedule(function()
      if handlers[name] then handlers[name](unpack(args, 1, n)) end
    end)
  end
  local function shut(reason)
    if conn.closed then return end
    conn.closed, conn.open = true, false
    if not tcp:is_closing() then tcp:close() end
    emit("on_close", reason)
  end

  function conn:send(text)
    if self.open then tcp:write(frame(0x1, text)) end
  end

  function conn:close()
    if self.open then tcp:write(frame(0x8, string.char(0x03, 0xe8))) end -- 1000: normal closure
    shut("closed by the client")
  end

  local host, port, path = parse_url(url)
  if not host then
    emit("on_refused", 0, "not a ws:// URL: " .. url)
    conn.closed = true
    return conn
  end
  local key = M.base64(random_bytes(16))
  local expect = M.base64(M.sha1(key .. "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
  local lines = {
    "GET " .. path .. " HTTP/1.1", "Host: " .. (host:find(":", 1, true) and "[" .. host .. "]" or host) .. ":" .. port, "Upgrade: websocket", "Connection: Upgrade",
    "Sec-WebSocket-Key: " .. key, "Sec-WebSocket-Version: 13",
  }
  for name, value in pairs(headers or {}) do
    lines[#lines + 1] = name .. ": " .. value
  end
  local buf, fragments, handshaken = "", {}, false

  local function on_data(data)
    buf = buf .. data
    if not handshaken then
      local head_end = buf:find("\r\n\r\n", 1, true)
      if not head_end then return end
      local head = buf:sub(1, head_end - 1)
      buf = buf:sub(head_end + 4)
      local status = tonumber(head:match("^HTTP/1%.1 (%d+)"))
      local accept = head:lower():match("\r\nsec%-websocket%-accept:%s*([^\r]+)")
      if status ~= 101 or not accept or accept ~= expect:lower() then
        conn.closed = true
        tcp:close()
        emit("on_refused", status or 0, head:match("^[^\r]*"))
        return
      end
      handshaken, conn.open = true, true
      emit("on_open")
    end
    while not conn.closed do
      local fin, opcode, payload, rest = parse_frame(buf)
      if fin == nil then return end
      if fin == "bad" then return shut("the server sent a masked frame") end
      buf = rest
      if opcode == 0x8 then
        return shut("closed by the server")
      elseif opcode == 0x9 then
        tcp:write(frame(0xA, payload))
      elseif opcode == 0x1 or opcode == 0x0 then
        fragments[#fragments + 1] = payload
        if fin then
          local text = table.concat(fragments)
          fragments = {}
          emit("on_message", text)
        end
      end
    end
  end

  uv.getaddrinfo(host, nil, { socktype = "stream" }, function(err, res)
    if err or not res or #res == 0 then
      return shut("cannot resolve " .. host .. ": " .. tostring(err))
    end
    tcp:connect(res[1].addr, port, function(cerr)
      if cerr then return shut("cannot connect to " .. host .. ":" .. port .. ": " .. cerr) end
      tcp:read_start(function(rerr, data)
        if rerr then return shut("read failed: " .. rerr) end
        if not data then return shut("the server closed the connection") end
        on_data(data)
      end)
      tcp:write(table.concat(lines, "\r\n") .. "\r\n\r\n")
    end)
  end)
  return conn
end

return M
