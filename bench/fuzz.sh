#!/bin/bash
# The long protocol fuzz run of both plugins (issue 10): REQUESTS requests per plugin (default 10,000) to a
# served netplugin (throwaway netns) and a served volplugin (throwaway Ceph), through pytest. The test suite
# runs the same tests with 600. As root, from the repository: bash bench/fuzz.sh [REQUESTS]
# About 2.5 minutes per plugin at 10,000 on 2 cores. Prints the counts per route and status.
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_REQUESTS="${1:-10000}"
exec .venv/bin/python -m pytest -q -s -p no:cacheprovider \
    tests/kernel/test_fuzz_netplugin.py tests/ceph/test_fuzz_volplugin.py
