"""The interface every storage backend implements; the driver never branches on the backend.

A backend knows block devices and their ownership. Filesystems, mount points, PGDATA and per-container
mount accounting are the driver's job (volplugin/driver.py), the same for every backend.
"""
from dataclasses import dataclass, field


@dataclass
class VolumeSpec:
    """What a volume is, as persisted by the driver (backend-specific fields live in ``backend_data``)."""

    name: str
    size: int  # bytes
    backend_data: dict = field(default_factory=dict)  # e.g. {"pool": "rbd", "image": "pg1"}


@dataclass
class Holder:
    """Who may write a volume right now."""

    host: str  # the host identity that holds the writer lock
    since: str = ""  # RFC 3339
    alive: bool = True  # False once the holder's clients have all gone (its watch expired)
    addresses: list[str] = field(default_factory=list)  # client addresses to fence


class Backend:
    name = ""
    host_local = False  # True: volumes exist on this host only (their record is local state, not shared)
    snapshot_freezes_filesystem = False  # True: the backend freezes a mounted filesystem itself

    def validate_name(self, name: str) -> None:
        """Refuse (InvalidRequest) a volume name this backend cannot use, before anything is created."""

    def status_facts(self, spec: VolumeSpec) -> dict:
        """Extra live facts for Docker's Get (called around every operation: cheap, local only)."""
        return {}

    def create(self, spec: VolumeSpec, clone_from: tuple[str, str] | None = None) -> dict:
        """Create the block volume (idempotent for an identical spec); return backend_data to persist."""
        raise NotImplementedError

    def remove(self, spec: VolumeSpec) -> None:
        """Remove it (an unknown volume is a success); refuse while attached anywhere."""
        raise NotImplementedError

    def exists(self, spec: VolumeSpec) -> bool:
        raise NotImplementedError

    def attach(self, spec: VolumeSpec) -> str:
        """Take the writer lock for this host and expose the volume as a block device; return its path.
        Idempotent on this host. Conflict (naming the holder) if another host holds it."""
        raise NotImplementedError

    def detach(self, spec: VolumeSpec) -> None:
        """Remove this host's block device and release this host's lock; never touches another host's."""
        raise NotImplementedError

    def attached(self) -> dict[str, str]:
        """Volumes attached on this host right now: {volume name: device path} (for reconciliation)."""
        raise NotImplementedError

    def holder(self, spec: VolumeSpec) -> Holder | None:
        raise NotImplementedError

    def info(self, spec: VolumeSpec) -> dict:
        """Live facts for Status: size, snapshots, ... (cheap, bounded by timeouts)."""
        raise NotImplementedError

    def cleanup_orphans(self) -> list[str]:
        """Tear down this host's half-dead attachments (start-up reconciliation, after the driver
        unmounted what sat on them) and release their locks; return the volumes cleaned up."""
        raise NotImplementedError

    def resize(self, spec: VolumeSpec, size_bytes: int) -> None:
        """Grow the volume (InvalidRequest for a shrink); a device attached on this host sees the new
        size when this returns. Conflict while another host holds it. The driver grows the filesystem."""
        raise NotImplementedError

    def snapshot_create(self, spec: VolumeSpec, snap: str) -> None:
        """Snapshot now (the driver freezes a mounted filesystem around the call); Conflict if it exists."""
        raise NotImplementedError

    def snapshot_list(self, spec: VolumeSpec) -> list[dict]:
        """[{"name", "size" (bytes), "created" (RFC 3339)}], oldest first."""
        raise NotImplementedError

    def snapshot_remove(self, spec: VolumeSpec, snap: str) -> None:
        """Remove a snapshot (an unknown one is a success); clones made from it keep working."""
        raise NotImplementedError

    def snapshot_rollback(self, spec: VolumeSpec, snap: str) -> None:
        """Roll back to ``snap``: Conflict (naming the holder) while attached anywhere; NotFound if no such
        snapshot."""
        raise NotImplementedError

    def break_lock(self, spec: VolumeSpec) -> Holder:
        """Admin command: fence the holding host's clients (alive or not) and drop its lock; return who
        held it. NotFound if nobody holds it; Conflict if this host does (detach instead)."""
        raise NotImplementedError


class Catalog:
    """Where volume records live so that every host sees every volume (Docker scope "global").

    A record is the volume's normalised options plus ``created_at``; for RBD it lives in the cluster, so
    a volume created on host A is found by host B's Get.
    """

    shared = True  # seen by every host: the driver trusts it over its local cache

    def catalog_put(self, name: str, record: dict) -> None:
        raise NotImplementedError

    def catalog_get(self, name: str) -> dict | None:
        raise NotImplementedError

    def catalog_list(self) -> list[str]:
        raise NotImplementedError

    def catalog_delete(self, name: str) -> None:
        raise NotImplementedError


class LocalOnlyCatalog(Catalog):
    """For host-local backends: the host's own state is the only record, so there is nothing to share."""

    shared = False

    def catalog_put(self, name: str, record: dict) -> None:
        pass

    def catalog_get(self, name: str) -> dict | None:
        return None

    def catalog_list(self) -> list[str]:
        return []

    def catalog_delete(self, name: str) -> None:
        pass
