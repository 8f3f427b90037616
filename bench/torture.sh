#!/bin/bash
# The long crash-injection tortures (issue 10), as root from the repository:
#   bash bench/torture.sh [OPERATIONS] [SEED]            # netplugin, default 1,000 operations
#   bash bench/torture.sh volplugin [OPERATIONS] [SEED]  # volplugin on RBD, default 1,000 operations
#   bash bench/torture.sh docker [OPERATIONS] [SEED]     # both, through a real dockerd, default 1,000
# netplugin: random operations through the socket of a plugin served in a throwaway netns, kill -9 between
# and in the middle of requests, an audit after every 25 (about 1.5 minutes at 1,000 on 2 cores).
# volplugin: random volume operations through the socket of a plugin on its own throwaway Ceph, kill -9,
# OSD stops and starts, data checks, an audit after every 10 (about 4.5 minutes at 1,000).
# docker: `docker` network, volume and container operations through the lab dockerd with kills of either
# plugin, plugin and dockerd restarts, OSD stops; an audit after every 10 (about 15 minutes at 1,000).
# The test suite runs the same tests with 200, 40 and 80 operations. Prints the counts of operations,
# faults and findings.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    volplugin) test=tests/ceph/test_torture_volplugin.py; shift ;;
    docker) test=tests/e2e/test_torture_e2e.py::test_docker_operations_with_crashes_leak_nothing; shift
            export DOCKER_TORTURE_OPS="${1:-1000}" DOCKER_TORTURE_SECONDS=7200
            [ -n "${2:-}" ] && export DOCKER_TORTURE_SEED="$2" ;;
    *) test=tests/kernel/test_torture_netplugin.py ;;
esac
export TORTURE_OPS="${1:-1000}"
[ -n "${2:-}" ] && export TORTURE_SEED="$2"
exec .venv/bin/python -m pytest -q -s -p no:cacheprovider "$test"
