-- Neovim with nothing but the Domino plugin, for the headless tests:
--   DOMINO_URL=ws://127.0.0.1:8000/v1/ws nvim --headless -u clients/nvim/test/minimal_init.lua FILE
local root = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h")
vim.opt.runtimepath:prepend(root)
vim.o.swapfile = false
vim.o.shadafile = "NONE"
vim.o.termguicolors = true
vim.o.laststatus = 2
vim.o.statusline = "%f %= %{v:lua.require'domino'.status()} "
vim.cmd("filetype plugin indent on")
vim.cmd("syntax on")
require("domino").setup({
  url = os.getenv("DOMINO_URL") or "ws://127.0.0.1:8000/v1/ws",
  initial_backoff_ms = 100,
  max_backoff_ms = 1000,
})
-- Its own colour (not Comment's), so the screenshot can tell ghost cells from comments.
vim.api.nvim_set_hl(0, "DominoGhost", { fg = "#8ec07c", italic = true })
