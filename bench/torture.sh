#!/bin/bash
# The long crash-injection torture of netplugin (issue 10): OPERATIONS random operations (default 1,000)
# through the socket of a plugin served in a throwaway netns, kill -9 between and in the middle of requests,
# an audit after every 25. The test suite runs the same test with 200. As root, from the repository:
#   bash bench/torture.sh [OPERATIONS] [SEED]
# About 1.5 minutes at 1,000 on 2 cores. Prints the counts of operations, faults and findings.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORTURE_OPS="${1:-1000}"
[ -n "${2:-}" ] && export TORTURE_SEED="$2"
exec .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/kernel/test_torture_netplugin.py
