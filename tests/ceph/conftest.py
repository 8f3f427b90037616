"""Ceph tests: the fixtures (ceph, own_ceph, new_ceph) live in tests/lab/ceph_fixtures.py, shared with
the e2e tests so that one session has one shared cluster."""
