#!/usr/bin/env bash
# The molecule part of `make test`: bring the lab up, run every scenario against it, and take the lab down
# again, whatever happened. Scenarios: molecule/*/molecule.yml (default, hybrid); MOLECULE_SCENARIOS picks some.
# KEEP_LAB=1 leaves the lab up afterwards (to look around). Runs as root, from the project venv.
#
# Only a machine that cannot run the lab at all (not root, no network namespaces, no /dev/net/tun) skips the
# scenarios, with a banner saying so; WEFT_SKIP_MOLECULE=1 skips them on purpose, with the same banner.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${VENV:-.venv}
export PATH="$root/$venv/bin:$PATH"

banner() {
    printf '\n%s\n' "################################################################################"
    printf '# %s\n' "$@"
    printf '%s\n\n' "################################################################################"
}

skip() {
    banner "MOLECULE SCENARIOS SKIPPED: $1" \
        "The Ansible collection was NOT tested against the lab. Fix the above and run: make test"
    exit 0
}

[ "${WEFT_SKIP_MOLECULE:-0}" = 1 ] && skip "WEFT_SKIP_MOLECULE=1"
[ "$(id -u)" = 0 ] || skip "not root (the lab builds namespaces and containers)"
[ -c /dev/net/tun ] || skip "no /dev/net/tun on this machine (the agent's encrypted path needs it)"
probe="weftmolprobe$$"
if ! ip netns add "$probe" 2>/dev/null; then
    skip "cannot create network namespaces here (ip netns add failed)"
fi
ip netns delete "$probe"

scenarios=${MOLECULE_SCENARIOS:-$(for f in molecule/*/molecule.yml; do basename "$(dirname "$f")"; done | sort)}

lab_down() {
    if [ "${KEEP_LAB:-0}" = 1 ]; then
        echo "molecule: KEEP_LAB=1: the lab stays up (make lab-down takes it down)"
    else
        echo "molecule: taking the lab down"
        make --no-print-directory lab-down || echo "molecule: make lab-down failed" >&2
    fi
}
trap lab_down EXIT

echo "molecule: bringing the lab up"
make --no-print-directory lab-up || { banner "MOLECULE: make lab-up FAILED"; exit 1; }
eval "$("$venv/bin/python" inventories/labenv.py exports)"
"$venv/bin/python" inventories/labenv.py check || exit 1
"$venv/bin/python" inventories/labvault.py ensure || exit 1

failed=()
for s in $scenarios; do
    banner "molecule test -s $s"
    if ! molecule test -s "$s"; then
        failed+=("$s")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    banner "MOLECULE: FAILED scenarios: ${failed[*]}"
    exit 1
fi
banner "MOLECULE: all scenarios passed: $(echo $scenarios)"
