-- A scripted typing session in headless Neovim, run after minimal_init.lua on a Python file whose
-- last line is empty (tests/test_ide_clients.py starts it). Keys go through nvim_input, the same
-- queue a terminal's keystrokes take, so the plugin's autocmds and mappings run as for a user.
--
-- Env: DOMINO_TEST_TYPED (the text to type, one key at a time), DOMINO_TEST_OUT (where the JSON
-- record goes), DOMINO_TEST_SCREEN (optional: a JSON dump of the screen while ghost text shows).
-- The record: keystrokes (latency from nvim_input to the ghost text, what the extmarks held),
-- burst (requests sent for keys typed inside the debounce), superseded (the finish reason of a
-- request overtaken by a keystroke), accept (buffer before and after <Tab>), error.

local domino = require("domino")
local uv = vim.loop
local out = { keystrokes = {}, messages = {} }
local co

local function now_ms()
  return uv.hrtime() / 1e6
end

local function sleep(ms)
  vim.defer_fn(function() coroutine.resume(co) end, ms)
  coroutine.yield()
end

local function wait(cond, timeout_ms)
  local deadline = now_ms() + timeout_ms
  while not cond() do
    if now_ms() > deadline then return false end
    sleep(5)
  end
  return true
end

local function text()
  return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
end

local function extmarks()
  local ns = vim.api.nvim_get_namespaces().domino
  local marks = {}
  for _, m in ipairs(vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })) do
    local d = m[4]
    local virt_lines = {}
    for _, l in ipairs(d.virt_lines or {}) do
      virt_lines[#virt_lines + 1] = l[1][1]
    end
    marks[#marks + 1] = { row = m[2], col = m[3], virt_text = d.virt_text and d.virt_text[1][1] or "",
                          virt_lines = virt_lines }
  end
  return marks
end

local ghost_at = 0
vim.api.nvim_create_autocmd("User", { pattern = "DominoGhost", callback = function() ghost_at = now_ms() end })

-- One key; waits for the answer to it (a ghost, or an empty/failed completion).
local function key(k, timeout_ms)
  local t0 = now_ms()
  vim.api.nvim_input(k == "<" and "<lt>" or k)
  local answered = wait(function()
    local last = domino.last()
    return last and last.started / 1e6 >= t0
  end, timeout_ms or 30000)
  local g = domino.ghost()
  local shown = answered and g ~= nil and ghost_at >= t0
  local last = domino.last() or {}
  return {
    key = k, answered = answered, shown = shown, latency_ms = shown and ghost_at - t0 or vim.NIL,
    text = answered and last.text or vim.NIL, finish_reason = answered and last.finish_reason or vim.NIL,
    tau = last.tau or vim.NIL, tokens_per_s = last.tokens_per_s or vim.NIL, extmarks = extmarks(),
    ghost = g and g.text or vim.NIL,
  }
end

local function dump_screen(path)
  vim.cmd("redraw!")
  local rows = {}
  for r = 1, vim.o.lines do
    local cells = {}
    for c = 1, vim.o.columns do
      cells[#cells + 1] = { vim.fn.screenstring(r, c), vim.fn.screenattr(r, c) }
    end
    rows[#rows + 1] = cells
  end
  local g = domino.ghost()
  -- Colours by attribute id: sampled where each kind of cell is known to be.
  local function color(group, what)
    local v = vim.fn.synIDattr(vim.fn.synIDtrans(vim.fn.hlID(group)), what .. "#", "gui")
    return v ~= "" and v or vim.NIL
  end
  local groups = {}
  for _, name in ipairs({ "DominoGhost", "Normal", "NonText", "StatusLine", "Statement", "Identifier", "Function",
                          "Number", "Comment", "Constant", "PreProc", "Type", "Special", "String", "ModeMsg" }) do
    groups[name] = { fg = color(name, "fg"), bg = color(name, "bg") }
  end
  -- Buffer cells: the syntax group under each; the ghost's first cell gives its attribute id.
  local syntax = {}
  for r = 1, vim.fn.line("$") do
    for c = 1, vim.o.columns do
      local id = vim.fn.screenattr(r, c)
      if syntax[id] == nil then
        local sid = vim.fn.synID(r, c, 1)
        if sid > 0 then syntax[id] = vim.fn.synIDattr(vim.fn.synIDtrans(sid), "name") end
      end
    end
  end
  -- The ghost starts at the cursor; when its first line is empty, on the virtual line below.
  local row, col = vim.fn.screenrow(), vim.fn.screencol()
  if not g.text:match("^[^\n]*%S") then
    row, col = row + 1, #g.text:match("\n([ \t]*)") + 1
  end
  syntax[vim.fn.screenattr(row, col)] = "DominoGhost"
  syntax[vim.fn.screenattr(vim.o.lines - 1, 1)] = "StatusLine"
  syntax[vim.fn.screenattr(vim.o.lines, 1)] = "ModeMsg"
  for r = 1, vim.o.lines - 2 do
    if vim.fn.screenstring(r, 1) == "~" and syntax[vim.fn.screenattr(r, 1)] == nil then
      syntax[vim.fn.screenattr(r, 1)] = "NonText"
    end
  end
  local attr_groups = {}
  for id, name in pairs(syntax) do
    attr_groups[tostring(id)] = name
  end
  vim.fn.writefile({ vim.json.encode({ rows = rows, attr_groups = attr_groups, groups = groups,
                                       cursor = { vim.fn.screenrow(), vim.fn.screencol() } }) }, path)
end

local function main()
  local client = domino.client()
  assert(wait(function() return client.state == "connected" end, 30000), "no connection: " .. client.detail)
  local on_message = client.on_message
  client.on_message = function(self, msg) -- record what the server answered, for the supersede check
    local m = vim.json.decode(msg)
    if m.type == "done" then out.messages[#out.messages + 1] = { id = m.id, finish_reason = m.finish_reason } end
    return on_message(self, msg)
  end
  vim.cmd("normal! G")
  vim.api.nvim_input("A")
  sleep(20)

  for ch in os.getenv("DOMINO_TEST_TYPED"):gmatch(".") do
    out.keystrokes[#out.keystrokes + 1] = key(ch)
  end

  -- Keys typed faster than the debounce: one request for the three.
  local before = client.next_id
  for _, ch in ipairs({ "<CR>", "r", "e" }) do
    vim.api.nvim_input(ch)
    sleep(10)
  end
  wait(function() return client.next_id > before and next(client.pending) == nil end, 30000)
  out.burst = { keys = 3, requests = client.next_id - before }

  -- A keystroke while a request runs: that request is cancelled (its done says so).
  before = client.next_id
  vim.api.nvim_input("t")
  assert(wait(function() return client.next_id > before end, 5000), "no request after a keystroke")
  local overtaken = "n" .. client.next_id
  local k = key("u")
  local reasons = {}
  for _, m in ipairs(out.messages) do
    if m.id == overtaken then reasons[#reasons + 1] = m.finish_reason end
  end
  out.superseded = { id = overtaken, finish_reasons = reasons, next = k }

  -- Accept: a ghost must be showing (ask for a block if the last key left none).
  if not domino.ghost() then
    vim.api.nvim_input("<M-\\>")
    wait(function() return domino.ghost() ~= nil end, 30000)
  end
  local g = domino.ghost()
  assert(g, "no ghost text to accept")
  if os.getenv("DOMINO_TEST_SCREEN") then dump_screen(os.getenv("DOMINO_TEST_SCREEN")) end
  local text_before, marks_before = text(), extmarks()
  vim.api.nvim_input("<Tab>")
  wait(function() return text() ~= text_before end, 2000)
  local cur = vim.api.nvim_win_get_cursor(0)
  out.accept = { before = text_before, ghost = g.text, after = text(), extmarks = marks_before,
                 cursor = { cur[1], cur[2] }, line_count = vim.api.nvim_buf_line_count(0), mode = vim.fn.mode() }
  out.status = domino.status()
end

co = coroutine.create(function()
  local ok, err = xpcall(main, debug.traceback)
  if not ok then out.error = err end
  vim.fn.writefile({ vim.json.encode(out) }, os.getenv("DOMINO_TEST_OUT"))
  vim.cmd("qa!")
end)
coroutine.resume(co)
