std = "lua54"
self = false -- methods need not use self
max_line_length = 120
files["spec"] = {std = "+busted"}
exclude_files = {"build", "lua_modules", ".luarocks"}
-- A to-be-closed guard is used by its close: `local _guard <close> = ...`.
ignore = {"211/_.*"}
