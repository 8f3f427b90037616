#!/bin/bash
# The long crash-injection tortures (issue 10), as root from the repository:
#   bash bench/torture.sh [OPERATIONS] [SEED]            # netplugin, default 1,000 operations
#   bash bench/torture.sh volplugin [OPERATIONS] [SEED]  # volplugin on RBD, default 1,000 operations
# netplugin: random operations through the socket of a plugin served in a throwaway netns, kill -9 between
# and in the middle of requests, an audit after every 25 (about 1.5 minutes at 1,000 on 2 cores).
# volplugin: random volume operations through the socket of a plugin on its own throwaway Ceph, kill -9,
# OSD stops and starts, data checks, an audit after every 10 (about 6 minutes at 1,000).
# The test suite runs the same tests with 200 resp. 40 operations. Prints the counts of operations,
# faults and findings.
set -euo pipefail
cd "$(dirname "$0")/.."
test=tests/kernel/test_torture_netplugin.py
if [ "${1:-}" = volplugin ]; then
    test=tests/ceph/test_torture_volplugin.py
    shift
fi
export TORTURE_OPS="${1:-1000}"
[ -n "${2:-}" ] && export TORTURE_SEED="$2"
exec .venv/bin/python -m pytest -q -s -p no:cacheprovider "$test"
