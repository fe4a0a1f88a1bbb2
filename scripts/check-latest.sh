#!/usr/bin/env bash
# Non-blocking check against the newest releases: set up a throwaway venv WITHOUT the lock,
# show which packages moved past requirements-lock.txt, and run the tests there. CI does not run
# this (its set-up is the locked one); run it before moving the lock.
#   bash scripts/check-latest.sh               # report + tests on the newest releases
#   bash scripts/check-latest.sh --write-lock  # and, if the tests pass, write the new lock
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${FTCLI_LATEST_VENV:-$(mktemp -d)/venv}"
FTCLI_UNLOCKED=1 FTCLI_VENV="$VENV" bash scripts/setup.sh || exit 1
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -E "^(ftcli|torch)==" > "$VENV/latest.txt"
echo "packages whose newest release differs from requirements-lock.txt:"
python3 - "$VENV/latest.txt" <<'PY'
import sys
def pins(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[name.lower().replace("_", "-")] = version
    return out
lock, latest = pins("requirements-lock.txt"), pins(sys.argv[1])
moved = [(n, lock.get(n, "-"), v) for n, v in sorted(latest.items()) if lock.get(n) != v]
for name, old, new in moved:
    print(f"  {name}: {old} -> {new}")
print(f"  ({len(moved)} moved)" if moved else "  none: the lock is current")
PY
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider
status=$?
if [ "$status" = 0 ] && [ "${1:-}" = "--write-lock" ]; then
  { sed -n '1,3p' requirements-lock.txt; cat "$VENV/latest.txt"; } > requirements-lock.txt.new
  mv requirements-lock.txt.new requirements-lock.txt
  echo "requirements-lock.txt moved to the newest releases (the tests passed on them)"
fi
exit "$status"
