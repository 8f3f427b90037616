"""A minimal PostgreSQL 15 test image, assembled from the host's Debian packages (no registry, no
debootstrap): ``docker import`` of a rootfs tar holding

- /usr/lib/postgresql/15/bin/{postgres,initdb,pg_ctl,psql,pg_isready,pgbench}, the server modules initdb
  loads (plpgsql, dict_snowball, the encoding conversions), /usr/share/postgresql/15 (less man pages
  and contrib extensions), /usr/share/zoneinfo/{UTC,Etc/UTC};
- the shared-library closure of all of these (``ldd``), every file at its host path with the host's
  symlink chain (merged /usr: /lib -> usr/lib, /lib64/ld-linux-x86-64.so.2 -> ...);
- the host's static busybox as /bin/busybox plus /bin/<applet> links (/bin/sh: initdb's popen());
- glibc's C.utf8 locale and a /bin/locale that lists it (initdb imports `locale -a` as collations);
- /etc/passwd and /etc/group with root and postgres (999:999), /tmp (1777), /var/run/postgresql
  (the socket directory) and /var/lib/postgresql owned 999;
- /docker-entrypoint.sh: initdb when $PGDATA/PG_VERSION is missing, then exec postgres listening on
  the Unix socket in /var/run/postgresql only (no TCP). Arguments given to ``docker run IMAGE ...``
  are appended to postgres' command line (``-c fsync=off``...); $POSTGRES_INITDB_ARGS to initdb's.

The image runs as 999:999 with PGDATA=/var/lib/postgresql/data/pgdata: mount the volume at
/var/lib/postgresql/data; the ``pgdata`` directory in it must exist, owned 999:999, mode 0700 (the
volume plugin creates it; initdb refuses a directory it can't write, postgres one with group/other
access). Talk to it with ``docker exec C psql -h /var/run/postgresql -U postgres`` (see psql()).

Host side: needs Debian's postgresql-15 and postgresql-client-15 (scripts/setup). Installing them runs
Debian's ``pg_createcluster 15 main`` unless createcluster.conf says ``create_main_cluster = false``;
nothing here uses, starts or needs that host cluster (host_clusters() lists them for checks).

Build the tar once per pytest session (build_postgres_tar, < 1 s) and import it into each dockerd
that needs it (import_postgres: idempotent, so call it again after a dockerd was recreated).
"""
from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import time
from pathlib import Path

from . import BUSYBOX, sh

PG_MAJOR = "15"
POSTGRES_IMAGE = f"netplugin-test/postgres:{PG_MAJOR}"
PG_BIN = f"/usr/lib/postgresql/{PG_MAJOR}/bin"
PG_PKGLIB = f"/usr/lib/postgresql/{PG_MAJOR}/lib"
PG_SHARE = f"/usr/share/postgresql/{PG_MAJOR}"
PG_UID = PG_GID = 999
PGDATA = "/var/lib/postgresql/data/pgdata"
MOUNT_POINT = "/var/lib/postgresql/data"  # where the volume goes; PGDATA is a subdirectory
SOCKET_DIR = "/var/run/postgresql"
PG_BINARIES = ("postgres", "initdb", "pg_ctl", "psql", "pg_isready", "pgbench")
# Server modules initdb or a plain server may load: PL/pgSQL (CREATE EXTENSION plpgsql), the
# snowball stemmers (snowball_create.sql), the encoding conversions, the WAL receiver/logical output.
_PKGLIB_KEEP = re.compile(r"^(plpgsql|dict_snowball|libpqwalreceiver|pgoutput|\w+_and_\w+)\.so$")
_SHARE_SKIP = ("man", "contrib")  # man pages; contrib's extension scripts are filtered below
ZONEINFO = ("/usr/share/zoneinfo/UTC", "/usr/share/zoneinfo/Etc/UTC")
APPLETS = ("sh", "sleep", "cat", "ls", "id", "chown", "chmod", "mkdir", "env", "rm", "echo",
           "test", "[", "ps", "kill", "du", "stat", "touch", "sync", "grep", "head", "tail")
ENV = {
    "PATH": f"{PG_BIN}:/bin",
    "PGDATA": PGDATA,
    "TZ": "UTC",
    "LANG": "C",
    "HOME": "/var/lib/postgresql",
}

ENTRYPOINT = f"""#!/bin/sh
# netplugin-test/postgres: initdb on first start, then postgres on the Unix socket only.
set -e
: "${{PGDATA:?PGDATA is not set}}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ ! -d "$PGDATA" ] || [ ! -w "$PGDATA" ]; then
        echo "entrypoint: $PGDATA must exist and be writable by $(id -u):$(id -g)" >&2
        ls -ld "$PGDATA" "$(dirname "$PGDATA")" >&2 || true
        exit 1
    fi
    echo "entrypoint: initdb -D $PGDATA" >&2
    initdb -D "$PGDATA" --auth=trust -E UTF8 --locale=C -U postgres $POSTGRES_INITDB_ARGS >&2
fi
exec postgres -D "$PGDATA" -c listen_addresses='' -c unix_socket_directories={SOCKET_DIR} "$@"
"""

# initdb imports the system's libc locales as collations from ``locale -a`` (popen): without a
# `locale` it prints "sh: locale: not found" and "WARNING: no usable system locales were found".
# The image gets Debian's C.utf8 (libc-bin, 400 kB) and a `locale` that lists it with C and POSIX.
C_UTF8 = "/usr/lib/locale/C.utf8"
LOCALE_STUB = """#!/bin/sh
# stand-in for glibc's locale(1): only `locale -a`
[ "$1" = "-a" ] || {{ echo "locale: only -a is supported here" >&2; exit 1; }}
printf '%s\\n' {locales}
"""

PASSWD = (f"root:x:0:0:root:/root:/bin/sh\n"
          f"postgres:x:{PG_UID}:{PG_GID}:PostgreSQL administrator:/var/lib/postgresql:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = f"root:x:0:\npostgres:x:{PG_GID}:\nnogroup:x:65534:\n"
# hosts: dns too (built into glibc since 2.34): swarm services find each other by name through Docker's DNS
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
HOSTS = "127.0.0.1 localhost\n::1 localhost\n"


def skip_reason() -> str | None:
    """Why the image can't be built here, or None."""
    for name in PG_BINARIES:
        if not os.access(f"{PG_BIN}/{name}", os.X_OK):
            return f"{PG_BIN}/{name} is missing (bash scripts/setup installs postgresql-{PG_MAJOR})"
    if not os.path.isdir(PG_SHARE):
        return f"{PG_SHARE} is missing"
    if not os.access(BUSYBOX, os.X_OK):
        return f"{BUSYBOX} is missing (busybox-static)"
    return None


# --- the rootfs tar ----------------------------------------------------------------------------

def _elf_files() -> list[str]:
    mods = sorted(f"{PG_PKGLIB}/{n}" for n in os.listdir(PG_PKGLIB) if _PKGLIB_KEEP.match(n))
    if f"{PG_PKGLIB}/plpgsql.so" not in mods:
        raise RuntimeError(f"{PG_PKGLIB}/plpgsql.so is missing")
    return [f"{PG_BIN}/{n}" for n in PG_BINARIES] + mods


_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+)\s+\(0x[0-9a-f]+\)\s*$")


def library_closure(paths: list[str]) -> list[str]:
    """Every shared library (and the dynamic loader) the ELF files ``paths`` need, as ldd
    resolves them on this host. ``ldd`` already lists the transitive closure."""
    out = sh(["ldd", *paths], timeout=60).stdout
    libs: set[str] = set()
    for line in out.splitlines():
        if line.endswith(":") or not line.strip():
            continue  # "path:" header when several files are given
        if "not found" in line:
            raise RuntimeError(f"ldd: a library is missing: {line.strip()}")
        m = _LDD_LINE.match(line)
        if m is None:
            if "statically linked" in line:
                continue
            raise RuntimeError(f"ldd: unexpected line {line!r}")
        path = m.group(2)
        if path.startswith("/"):  # leaves out linux-vdso.so.1
            libs.add(path)
    return sorted(libs)


class _RootfsTar:
    """A tar being written, with the parent directories and host symlink chains of what is added."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar = tar
        self.names: set[str] = set()

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        name = path.strip("/")
        if not name or name in self.names:
            return
        self.dir(os.path.dirname(name))
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, gid
        info.mtime = int(time.time())
        self.tar.addfile(info)
        self.names.add(name)

    def symlink(self, path: str, target: str) -> None:
        name = path.strip("/")
        if name in self.names:
            return
        self.dir(os.path.dirname(name))
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self.tar.addfile(info)
        self.names.add(name)

    def data(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        name = path.strip("/")
        raw = content.encode() if isinstance(content, str) else content
        self.dir(os.path.dirname(name))
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(raw), mode, int(time.time())
        self.tar.addfile(info, io.BytesIO(raw))
        self.names.add(name)

    def file_as(self, host_path: str, path: str) -> None:
        """Host file ``host_path`` (symlinks followed) as ``path``."""
        name = path.strip("/")
        self.dir(os.path.dirname(name))
        info = self.tar.gettarinfo(os.path.realpath(host_path), arcname=name)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        with open(host_path, "rb") as f:
            self.tar.addfile(info, f)
        self.names.add(name)

    def host(self, path: str) -> None:
        """Add host ``path`` where the host has it: each symlink met on the way (in a parent
        directory or the file itself) is added as a symlink and followed."""
        path = os.path.normpath(path)
        todo, seen = [path], set()
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            # the first symlink among the parents, if any
            parts = p.strip("/").split("/")
            for i in range(1, len(parts)):
                parent = "/" + "/".join(parts[:i])
                if os.path.islink(parent):
                    self.symlink(parent, os.readlink(parent))
                    target = os.path.join(os.path.dirname(parent), os.readlink(parent))
                    todo.append(os.path.normpath(os.path.join(target, *parts[i:])))
                    break
            else:
                self._leaf(p, todo)

    def _leaf(self, p: str, todo: list[str]) -> None:
        name = p.strip("/")
        if name in self.names:
            return
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(p)
            self.symlink(p, target)
            todo.append(os.path.normpath(os.path.join(os.path.dirname(p), target)))
        elif stat.S_ISDIR(st.st_mode):
            self.dir(p, stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            self.dir(os.path.dirname(name))
            info = self.tar.gettarinfo(p, arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with open(p, "rb") as f:
                self.tar.addfile(info, f)
            self.names.add(name)
        else:
            raise RuntimeError(f"{p}: not a file, directory or symlink")

    def host_tree(self, root: str, skip=lambda rel: False) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            dirnames[:] = sorted(d for d in dirnames
                                 if not skip(os.path.normpath(os.path.join(rel_dir, d))))
            self.host(dirpath)
            for fn in sorted(filenames):
                if not skip(os.path.normpath(os.path.join(rel_dir, fn))):
                    self.host(os.path.join(dirpath, fn))


def _skip_share(rel: str) -> bool:
    top = rel.split("/", 1)[0]
    if top in _SHARE_SKIP:
        return True
    if top == "extension" and "/" in rel:  # only PL/pgSQL of the extension scripts
        return not os.path.basename(rel).startswith("plpgsql")
    return False


def _applets() -> list[str]:
    listed = sh([BUSYBOX, "--list"], timeout=10).stdout.split()
    missing = [a for a in APPLETS if a not in listed]
    if missing:
        raise RuntimeError(f"{BUSYBOX} lacks applets {missing}")
    return sorted(set(listed) - {"busybox"})


def build_postgres_tar(dest: Path) -> Path:
    """Write the rootfs tar ``dest`` for POSTGRES_IMAGE (uncompressed, ~80 MB, < 1 s) and
    return it. Pure Python apart from ``ldd`` and ``busybox --list``: no rootfs dir on disk."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(f"can't build {POSTGRES_IMAGE}: {reason}")
    dest = Path(dest)
    elves = _elf_files()
    libs = library_closure(elves)
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as raw:
        t = _RootfsTar(raw)
        for d in ("etc", "proc", "sys", "dev", "run", "root", "var", "usr/lib", "usr/share"):
            t.dir(d, 0o700 if d == "root" else 0o755)
        t.dir("tmp", 0o1777)
        t.dir("var/tmp", 0o1777)
        t.dir("var/lib/postgresql", 0o755, PG_UID, PG_GID)
        t.dir(MOUNT_POINT, 0o755, PG_UID, PG_GID)  # the volume is mounted over it
        t.dir(SOCKET_DIR, 0o2775, PG_UID, PG_GID)
        # busybox: /bin real directory (not the host's /bin -> usr/bin) with every applet
        t.file_as(BUSYBOX, "bin/busybox")
        for applet in _applets():
            t.symlink(f"bin/{applet}", "busybox")
        for path in elves + libs:
            t.host(path)
        t.host_tree(PG_SHARE, _skip_share)
        for path in ZONEINFO:
            t.host(path)
        t.data("etc/passwd", PASSWD)
        t.data("etc/group", GROUP)
        t.data("etc/nsswitch.conf", NSSWITCH)
        t.data("etc/hosts", HOSTS)
        t.data("docker-entrypoint.sh", ENTRYPOINT, 0o755)
        locales = ["C", "POSIX"]
        if os.path.isdir(C_UTF8):
            t.host_tree(C_UTF8)
            locales.insert(1, os.path.basename(C_UTF8))
        if "bin/locale" not in t.names:
            t.data("bin/locale", LOCALE_STUB.format(locales=" ".join(locales)), 0o755)
    os.replace(tmp, dest)
    return dest


# --- docker side -------------------------------------------------------------------------------

def import_changes() -> list[str]:
    """``docker import --change`` arguments: user, environment, entrypoint."""
    changes = [f"USER {PG_UID}:{PG_GID}", "WORKDIR /", 'ENTRYPOINT ["/docker-entrypoint.sh"]']
    changes += [f"ENV {k}={v}" for k, v in ENV.items()]
    return [arg for c in changes for arg in ("--change", c)]


def import_postgres(dockerd, tar: Path, *, force: bool = False) -> str:
    """Import ``tar`` as POSTGRES_IMAGE into ``dockerd`` (a tests.lab.dockerd.Dockerd) unless it
    is there already; returns the tag. Cheap when present: call it in every test, since
    Dockerd.recreate() only re-imports the busybox image."""
    if not force and dockerd.docker("image", "inspect", POSTGRES_IMAGE, check=False).returncode == 0:
        return POSTGRES_IMAGE
    dockerd.docker("import", *import_changes(), str(tar), POSTGRES_IMAGE, timeout=120)
    return POSTGRES_IMAGE


def psql_argv(sql: str, db: str = "postgres") -> list[str]:
    return ["psql", "-h", SOCKET_DIR, "-U", "postgres", "-d", db, "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1", "-c", sql]


def psql(docker, container: str, sql: str, *, db: str = "postgres", timeout: float = 30.0) -> str:
    """Run ``sql`` with psql inside ``container`` (unaligned, tuples only: rows as ``a|b`` lines,
    of the last statement) and return its output stripped. ``docker`` is the e2e ``docker``
    fixture (Dockerd.docker). Raises ShError (with psql's stderr) on an SQL error."""
    return docker("exec", container, *psql_argv(sql, db), timeout=timeout).stdout.strip()


def wait_pg_ready(docker, container: str, timeout: float = 60.0) -> float:
    """Wait until postgres in ``container`` accepts connections on its socket; returns the seconds
    waited. Fails fast (with ``docker logs``) if the container stops; TimeoutError after
    ``timeout``."""
    start = time.monotonic()
    while True:
        res = docker("exec", container, "pg_isready", "-q", "-h", SOCKET_DIR, "-U", "postgres",
                     check=False, timeout=15)
        if res.returncode == 0:
            return time.monotonic() - start
        state = docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", container,
                       check=False).stdout.strip()
        if not state.startswith("running"):
            raise RuntimeError(f"postgres container {container} is {state or 'gone'}:\n"
                               f"{container_logs(docker, container)}")
        if time.monotonic() - start >= timeout:
            raise TimeoutError(f"postgres in {container} not ready after {timeout:.0f}s "
                               f"(pg_isready: {res.returncode}):\n{container_logs(docker, container)}")
        time.sleep(0.1)


def container_logs(docker, container: str, lines: int = 40) -> str:
    res = docker("logs", "--tail", str(lines), container, check=False)
    return (res.stdout + res.stderr).strip()


def prepare_volume_dir(root: Path) -> Path:
    """Make ``root`` look like a volume the plugin prepared: ``root`` 0755, ``root/pgdata``
    owned 999:999 mode 0700. Returns ``root`` (bind-mount it at MOUNT_POINT)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    pgdata = root / os.path.basename(PGDATA)
    pgdata.mkdir(exist_ok=True)
    os.chown(pgdata, PG_UID, PG_GID)
    os.chmod(pgdata, 0o700)
    return root


def host_clusters() -> list[dict]:
    """The host's own Debian clusters (``pg_lsclusters``): [{version, cluster, port, status}].
    Nothing in the tests starts one; a check that none is online can use this."""
    res = sh(["pg_lsclusters", "--no-header"], check=False, timeout=30)
    if res.returncode != 0:
        return []
    clusters = []
    for line in res.stdout.splitlines():
        f = line.split()
        if len(f) >= 4:
            clusters.append({"version": f[0], "cluster": f[1], "port": f[2], "status": f[3]})
    return clusters
