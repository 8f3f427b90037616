"""The ceph.conf of the embedded cluster (volplugin.cephlab): its settings, section by section, and the
text written from them."""
from __future__ import annotations

PG_NUM = 8  # few PGs: less peering after each OSD start
# ceph.conf, section by section; conf_text() fills in the {placeholders}.
SETTINGS = {
    "global": {
        "fsid": "{fsid}", "mon_host": "{mon_host}", "run_dir": "{d}/run", "crash_dir": "{d}/crash",
        # loopback and IPv4 only (without cluster_addr the OSD's back ports bind 0.0.0.0)
        "public_addr": "127.0.0.1", "cluster_addr": "127.0.0.1", "ms_bind_ipv4": "true",
        "ms_bind_ipv6": "false", "auth_cluster_required": "none", "auth_service_required": "none",
        "auth_client_required": "none",
        # one copy on one OSD, without health alarms about it
        "osd_pool_default_size": 1, "osd_pool_default_min_size": 1, "osd_crush_chooseleaf_type": 0,
        "osd_pool_default_pg_num": PG_NUM, "osd_pool_default_pgp_num": PG_NUM,
        "osd_pool_default_pg_autoscale_mode": "off", "mon_allow_pool_size_one": "true",
        "mon_warn_on_pool_no_redundancy": "false",
        # the mon would shut down below 5 % free disk; there is no mgr to miss
        "mon_data_avail_warn": 1, "mon_data_avail_crit": 0, "mon_mgr_mkfs_grace": 315360000,
        # never mark the only OSD out (its data would have nowhere to go); pool and snapshot
        # operations would wait ~1 s each for a paxos round
        "mon_osd_down_out_interval": 0, "paxos_propose_interval": 0.05,
        # nothing rotates the logs: no rocksdb stats dumps or per-PG peering lines (the
        # in-memory level 5 is still dumped on a crash)
        "debug_rocksdb": "0/5", "debug_osd": "0/5", "debug_mon": "0/5", "debug_paxos": "0/5",
    },
    "mon": {"mon_data": "{d}/mon", "pid_file": "{d}/run/mon.pid", "log_file": "{d}/log/mon.log",
            "admin_socket": "{mon_asok}", "mon_cluster_log_file": "{d}/log/$cluster.$channel.log"},
    "osd": {
        "osd_data": "{d}/osd", "pid_file": "{d}/run/osd.pid", "log_file": "{d}/log/osd.log",
        "admin_socket": "{osd_asok}", "osd_memory_target": "{memory}",
        # how long a dead client's watch (so its exclusive lock) outlives it
        "osd_client_watch_timeout": "{watch_timeout}",
        "osd_objectstore": "{objectstore}", "osd_op_num_shards": 2, "osd_op_num_threads_per_shard": 1,
    },
    # no admin socket: clients would fight over one path ("File exists"); the timeouts keep a
    # client of a dead cluster from waiting 300 s to connect, or forever for an op
    "client": {"admin_socket": "", **dict.fromkeys(
        ("client_mount_timeout", "rados_osd_op_timeout", "rados_mon_op_timeout"), "{client_timeout}")},
}
# [osd] settings of each EmbeddedCeph(objectstore=...)
STORE_SETTINGS = {
    # a sparse block file made at mkfs as osd_data/block (the default bluestore_block_path: set to
    # that explicitly it points at itself). bdev_aio_poll_ms: the OSD opens and closes the block file
    # once per op shard and a few times mounting, each close waiting out an aio poll (250 ms by
    # default): most of its start.
    "bluestore": {"bluestore_block_create": "true", "bluestore_block_size": "{block_size}",
                  "bdev_aio_poll_ms": 20},
    # Objects in the OSD's memory, written to osd_data only at a clean stop (a kill -9 loses them).
    # For throwaway clusters on tmpfs (the VM lane's guest): bluestore opens its block file with
    # O_DIRECT, which the guest's tmpfs (Linux 6.1) refuses: its mkfs fails with EINVAL.
    "memstore": {"memstore_device_bytes": "{block_size}"},
}


def conf_text(values: dict, objectstore: str) -> str:
    """ceph.conf with ``values`` in the placeholders, the [osd] section completed for ``objectstore``."""
    sections = dict(SETTINGS, osd={**SETTINGS["osd"], **STORE_SETTINGS[objectstore]})
    return "# Written by volplugin.cephlab at every ensure_running(): edits are lost.\n" + "".join(
        f"\n[{section}]\n" + "".join(f"{k} = {str(v).format(**values)}\n" for k, v in kv.items())
        for section, kv in sections.items())
