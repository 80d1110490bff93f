#!/bin/sh
# Usage: sanitizer-logs.sh DIR. Prints the ASan/LSan/UBSan reports in DIR
# that concern our code and exits 1 if there is any. Every process a spec
# starts inherits the preloaded runtime, so DIR also holds reports of peers
# (python3's exit-time leaks, gcc's under luarocks): a report counts when a
# frame lies in the core, luahost or the Lua interpreter running them.
dir=$1
found=0
for f in "$dir"/*; do
  [ -f "$f" ] || continue
  grep -Eq 'core\.so|luahost|lua5\.4| (src|fuzz)/[a-z_]+\.c' "$f" || continue
  cat "$f"
  found=1
done
if [ $found = 1 ]; then
  echo "sanitize: reports above (all logs in $dir)"
else
  echo "sanitize: no report from our code ($(ls "$dir" | wc -l) peer logs ignored)"
fi
exit $found
