"""volplugin: a Docker volume driver for PostgreSQL data volumes (Ceph RBD, LVM thin).

Only the protocol skeleton exists so far: no storage backend is implemented yet (issues 3 and 7).
"""
