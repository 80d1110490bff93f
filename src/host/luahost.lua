#!/usr/bin/env lua5.4
-- luahost for LuaRocks installs (a rock cannot build an executable): the
-- same entry point as src/host/main.c, on the interpreter LuaRocks wraps.
local argv = {[0] = arg[0]}
for i = 1, #arg do argv[i] = arg[i] end
os.exit(require("tcpserver.host").main(argv))
