#!/bin/sh
# The managed plugin's process (PID 1 of the plugin container): docker-db-plugin-entrypoint SERVICE.
# netplugin: use the iptables backend that holds dockerd's rules (Debian's iptables can write either
# nf_tables or the legacy tables; rules in the other one would be invisible to Docker's FORWARD chain),
# or NETPLUGIN_IPTABLES=nft|legacy. Then exec `SERVICE serve`: gunicorn's master becomes PID 1 (it
# forwards SIGTERM to its workers and reaps every child, orphans included).
set -eu
service=${1:?usage: docker-db-plugin-entrypoint netplugin|volplugin}
shift
if [ -r /etc/docker-db-plugins/build ]; then
    echo "docker-db-plugin-entrypoint: $(tr '\n' ' ' </etc/docker-db-plugins/build)" >&2
fi
if [ "$service" = netplugin ]; then
    mode=${NETPLUGIN_IPTABLES:-auto}
    if [ "$mode" = auto ]; then
        legacy=$(iptables-legacy-save 2>/dev/null | grep -c '^-A' || true)
        nft=$(iptables-nft-save 2>/dev/null | grep -c '^-A' || true)
        if [ "${legacy:-0}" -gt "${nft:-0}" ]; then mode=legacy; else mode=nft; fi
    fi
    case "$mode" in
        nft | legacy) ;;
        *) echo "docker-db-plugin-entrypoint: NETPLUGIN_IPTABLES=$mode: use auto, nft or legacy" >&2; exit 2 ;;
    esac
    for tool in iptables ip6tables; do
        update-alternatives --quiet --set "$tool" "/usr/sbin/$tool-$mode"
    done
    echo "docker-db-plugin-entrypoint: iptables backend $mode" >&2
fi
exec "/opt/docker-db-plugins/bin/$service" serve "$@"
