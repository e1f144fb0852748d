# Sourced by the device scripts: the deadline clock, the carried wheels
# and one timed, logged row. Set `deadline` (seconds, counted from `start`) before sourcing.
start=${start:-$(date +%s)}
left() { echo $(( deadline - ($(date +%s) - start) )); }

install_wheels() {  # install_wheels DIR TARGET: the carried wheels of DIR into TARGET
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$2" "$1"/*.whl || exit 1
}

use_wheels_and_log_commit() {  # the installed wheels and this checkout on the path; the commit line
  export PYTHONPATH=/tmp/site:$PWD
  echo "commit $(cat .kha_commit 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
}

# logged_row NAME CAP_S PATTERN COMMAND...: COMMAND under timeout min(CAP_S, time left - 5 s)
# (skipped when under 45 s), its output in $OUT/NAME.log; prints its exit code and the log's
# lines that match PATTERN.
logged_row() {
  local name=$1 cap=$2 pattern=$3; shift 3
  local t=$(( $(left) - 5 )); [ $t -gt $cap ] && t=$cap
  [ $t -lt 45 ] && { echo "== $name: skipped, $(left) s left"; return; }
  echo "== $name (timeout ${t}s)"
  timeout --kill-after=10 $t "$@" > $OUT/$name.log 2>&1
  echo "== $name: exit $?"
  grep -E "$pattern" $OUT/$name.log | cut -c1-260
}
