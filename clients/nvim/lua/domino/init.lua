-- Domino ghost-text completion for Neovim (0.7 and newer) over the `/v1/ws` completion API.
--
--   require("domino").setup({ url = "ws://127.0.0.1:8000/v1/ws" })
--
-- While typing in insert mode, each pause of `debounce_ms` asks for a single-line completion at the
-- cursor; `keys.multiline` asks for a block. Every keystroke cancels the request in flight (the
-- server also supersedes by the buffer's URI), and an answer is shown only if the buffer and the
-- cursor are still where it was asked. The ghost text is an extmark: the first line at the cursor,
-- the others as virtual lines below.

local client_mod = require("domino.client")

local M = {}

local defaults = {
  url = "ws://127.0.0.1:8000/v1/ws",
  api_key = nil, -- a string, or a function returning one; nil: $DOMINO_API_KEY
  filetypes = { ["*"] = true, markdown = false, text = false, help = false, gitcommit = false },
  debounce_ms = 75,
  max_tokens = 64, -- single line, while typing
  multiline_max_tokens = 256, -- on keys.multiline
  deadline_ms = 2000, -- the server returns what it has after this long
  method = nil, -- ar | ngram | dflash | domino | domino+ngram; nil: the server's default
  prefix_chars = 8000,
  suffix_chars = 2000,
  extra_files = 3, -- other loaded buffers sent as context (the first 4000 characters of each)
  keys = { accept = "<Tab>", dismiss = "<C-]>", multiline = "<M-\\>" }, -- false: no mapping
  initial_backoff_ms = 250,
  max_backoff_ms = 10000,
}

local ns = vim.api.nvim_create_namespace("domino")
local state = {
  config = nil,
  client = nil,
  timer = nil,
  request = nil, -- {id, buf, row, col, tick, started}: the request in flight
  ghost = nil, -- {buf, row, col, text, mark}: the suggestion on screen
  last = nil, -- {latency_ms, tau, tokens_per_s, method, finish_reason, text}: the last answer
}

-- ---- ghost text ---------------------------------------------------------------------------------
local function clear_ghost()
  if state.ghost and vim.api.nvim_buf_is_valid(state.ghost.buf) then
    vim.api.nvim_buf_del_extmark(state.ghost.buf, ns, state.ghost.mark)
  end
  state.ghost = nil
end

local function show_ghost(buf, row, col, text)
  clear_ghost()
  local lines = vim.split(text, "\n", { plain = true })
  local opts = { hl_mode = "combine" }
  if lines[1] ~= "" then
    opts.virt_text = { { lines[1], "DominoGhost" } }
    if vim.fn.has("nvim-0.10") == 1 then
      opts.virt_text_pos = "inline"
    else
      opts.virt_text_win_col = vim.fn.virtcol(".") - 1 -- drawn over the rest of the line, if any
    end
  end
  if #lines > 1 then
    opts.virt_lines = {}
    for i = 2, #lines do
      opts.virt_lines[#opts.virt_lines + 1] = { { lines[i], "DominoGhost" } }
    end
  end
  local mark = vim.api.nvim_buf_set_extmark(buf, ns, row, col, opts)
  state.ghost = { buf = buf, row = row, col = col, text = text, mark = mark }
end

local function cancel_request()
  if state.request then
    state.client:cancel(state.request.id)
    state.request = nil
  end
end

-- ---- asking -------------------------------------------------------------------------------------
local function enabled(buf)
  if vim.bo[buf].buftype ~= "" then return false end
  local ft = state.config.filetypes
  local on = ft[vim.bo[buf].filetype]
  if on == nil then on = ft["*"] end
  return on ~= false
end

local function buffer_text(buf)
  return table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n")
end

-- Other loaded files, most recently used last (the order `extra` wants: most relevant last).
local function extra_files(current)
  local bufs = {}
  for _, b in ipairs(vim.api.nvim_list_bufs()) do
    if b ~= current and vim.api.nvim_buf_is_loaded(b) and vim.bo[b].buftype == "" and vim.api.nvim_buf_get_name(b) ~= "" then
      bufs[#bufs + 1] = { buf = b, used = vim.fn.getbufinfo(b)[1].lastused }
    end
  end
  table.sort(bufs, function(a, b) return a.used < b.used end)
  local out = {}
  for i = math.max(1, #bufs - state.config.extra_files + 1), #bufs do
    local b = bufs[i].buf
    out[#out + 1] = { filename = vim.fn.fnamemodify(vim.api.nvim_buf_get_name(b), ":."),
                      text = buffer_text(b):sub(1, 4000) }
  end
  return out
end

-- (prefix, suffix) at (row, col): at most prefix_chars before and suffix_chars after, whole lines.
local function cursor_window(buf, row, col)
  local c = state.config
  local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  local cur = lines[row + 1] or ""
  local before, after = { cur:sub(1, col) }, { cur:sub(col + 1) }
  local size = #before[1]
  for r = row, 1, -1 do
    size = size + #lines[r] + 1
    if size > c.prefix_chars then break end
    table.insert(before, 1, lines[r])
  end
  size = #after[1]
  for r = row + 2, #lines do
    size = size + #lines[r] + 1
    if size > c.suffix_chars then break end
    after[#after + 1] = lines[r]
  end
  return table.concat(before, "\n"), table.concat(after, "\n")
end

local function fire(event)
  vim.api.nvim_exec_autocmds("User", { pattern = event, modeline = false })
end

local function on_done(req, err, done)
  if state.request == req then state.request = nil end
  if err then
    state.last_error = err
    return fire("DominoDone")
  end
  state.last_error = nil
  if done.finish_reason == "cancelled" then return fire("DominoDone") end
  local spec = done.spec ~= vim.NIL and done.spec or {}
  state.last = {
    latency_ms = (vim.loop.hrtime() - req.started) / 1e6, tau = spec.tau, tokens_per_s = spec.tokens_per_s,
    method = spec.method, finish_reason = done.finish_reason, text = done.text, started = req.started,
  }
  local cursor = vim.api.nvim_win_get_cursor(0)
  local current = vim.api.nvim_get_current_buf() == req.buf and vim.api.nvim_buf_get_changedtick(req.buf) == req.tick
    and cursor[1] - 1 == req.row and cursor[2] == req.col and vim.fn.mode() == "i"
  if current and done.text:match("%S") then
    show_ghost(req.buf, req.row, req.col, done.text)
    fire("DominoGhost")
  end
  fire("DominoDone")
end

--- Ask for a completion at the cursor now (multiline: a block instead of one line).
function M.request(multiline)
  cancel_request()
  clear_ghost()
  local buf = vim.api.nvim_get_current_buf()
  if not enabled(buf) then return end
  local c = state.config
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local prefix, suffix = cursor_window(buf, row, col)
  local name = vim.api.nvim_buf_get_name(buf)
  local msg = {
    prefix = prefix, suffix = suffix, language = vim.bo[buf].filetype, single_line = not multiline,
    multi_line = multiline or false, max_tokens = multiline and c.multiline_max_tokens or c.max_tokens,
    deadline_ms = c.deadline_ms, method = c.method, document = vim.uri_from_bufnr(buf),
    filename = name ~= "" and vim.fn.fnamemodify(name, ":.") or nil,
  }
  local extra = extra_files(buf)
  if #extra > 0 then msg.extra = extra end -- an empty Lua table would be sent as {} (not a list)
  local req = { buf = buf, row = row, col = col, tick = vim.api.nvim_buf_get_changedtick(buf),
                started = state.keystroke or vim.loop.hrtime() }
  state.keystroke = nil -- latency counts from the keystroke that led to this request, or from now
  state.request = req
  req.id = state.client:complete(msg, function(err, done) on_done(req, err, done) end)
  if not req.id and state.request == req then state.request = nil end
end

-- A keystroke: drop what is shown and in flight, ask again after the debounce.
local function on_change()
  state.keystroke = vim.loop.hrtime()
  cancel_request()
  clear_ghost()
  if state.timer then state.timer:stop() end
  state.timer:start(state.config.debounce_ms, 0, vim.schedule_wrap(function()
    if vim.fn.mode() == "i" then M.request(false) end
  end))
end

-- ---- accepting ----------------------------------------------------------------------------------
--- Insert the ghost text at the cursor; false when there is none.
function M.accept()
  local g = state.ghost
  if not g or g.buf ~= vim.api.nvim_get_current_buf() then return false end
  clear_ghost()
  local lines = vim.split(g.text, "\n", { plain = true })
  vim.api.nvim_buf_set_text(g.buf, g.row, g.col, g.row, g.col, lines)
  local last_row = g.row + #lines - 1
  local last_col = (#lines == 1 and g.col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { last_row + 1, last_col })
  return true
end

function M.dismiss()
  cancel_request()
  clear_ghost()
end

--- The suggestion on screen ({buf, row, col, text}) or nil.
function M.ghost()
  return state.ghost
end

--- For a statusline: connection state and the last completion's latency, τ and speed.
function M.status()
  if not state.client then return "Domino: off" end
  local s = "Domino: " .. state.client.state
  local l = state.last
  if state.client.state == "connected" and l then
    s = s .. string.format(" %d ms", l.latency_ms)
    if l.tau then s = s .. string.format(" τ %.1f %d tok/s", l.tau, l.tokens_per_s) end
  end
  return s
end

--- The last finished (not cancelled) answer: {latency_ms, tau, tokens_per_s, method, finish_reason,
--- text, started (vim.loop.hrtime() of its keystroke)}, or nil.
function M.last()
  return state.last
end

function M.client()
  return state.client
end

-- ---- setup --------------------------------------------------------------------------------------
local function map(lhs, fn, fallback)
  if not lhs then return end
  vim.keymap.set("i", lhs, function()
    if not fn() and fallback then
      vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(lhs, true, false, true), "n", false)
    end
  end, { desc = "Domino" })
end

function M.setup(opts)
  if state.client then state.client:stop() end
  local c = vim.tbl_deep_extend("force", defaults, opts or {})
  if c.api_key == nil then c.api_key = function() return os.getenv("DOMINO_API_KEY") end end
  state.config = c
  state.timer = state.timer or vim.loop.new_timer()
  state.client = client_mod.new({
    url = c.url, api_key = c.api_key, initial_backoff_ms = c.initial_backoff_ms, max_backoff_ms = c.max_backoff_ms,
    on_state = function() fire("DominoState") end,
  })
  vim.api.nvim_set_hl(0, "DominoGhost", { link = "Comment", default = true })
  local group = vim.api.nvim_create_augroup("domino", { clear = true })
  vim.api.nvim_create_autocmd("TextChangedI", { group = group, callback = on_change })
  vim.api.nvim_create_autocmd("CursorMovedI", { group = group, callback = function()
    local at, cursor = state.ghost or state.request, vim.api.nvim_win_get_cursor(0)
    if at and (cursor[1] - 1 ~= at.row or cursor[2] ~= at.col) then M.dismiss() end
  end })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, { group = group, callback = M.dismiss })
  map(c.keys.accept, M.accept, true)
  map(c.keys.dismiss, function() local shown = state.ghost ~= nil; M.dismiss(); return shown end, true)
  map(c.keys.multiline, function() M.request(true); return true end, false)
  vim.api.nvim_create_user_command("DominoStatus", function()
    local e = state.last_error
    print(M.status() .. " (" .. state.client.detail .. ")" .. (e and ("; last error: " .. e.code .. ": " .. e.message) or ""))
  end, {})
  vim.api.nvim_create_user_command("DominoReconnect", function() state.client:reconnect() end, {})
  state.client:connect()
end

return M
