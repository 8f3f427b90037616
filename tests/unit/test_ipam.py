"""Unit tests for the remote IPAM driver core (netplugin.ipam) on a real SQLite store."""
import multiprocessing

import pytest

from netplugin.ipam import IPAM_SCHEMA, Ipam
from plugincore.errors import Conflict, InvalidRequest, NotFound
from plugincore.store import Store

GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


@pytest.fixture
def ipam(tmp_path):
    return Ipam(Store(str(tmp_path / "s.db"), IPAM_SCHEMA))


def pool(ipam, cidr, sub="", space="local", v6=False, options=None):
    return ipam.request_pool(space, cidr, sub, options, v6)["PoolID"]


def address(ipam, pool_id, wanted="", options=None):
    return ipam.request_address(pool_id, wanted, options)["Address"]


def pool_row(ipam, pool_id):
    return next(p for p in ipam.pools() if p["id"] == pool_id)


# ---- discovery ----------------------------------------------------------------------------

def test_capabilities_and_default_spaces(ipam):
    assert ipam.capabilities() == {"RequiresMACAddress": False, "RequiresRequestReplay": False}
    assert ipam.default_address_spaces() == {
        "LocalDefaultAddressSpace": "local", "GlobalDefaultAddressSpace": "global"}


# ---- pools --------------------------------------------------------------------------------

def test_request_pool_returns_id_and_cidr(ipam):
    reply = ipam.request_pool("local", "10.77.0.0/24", "", {"foo": "bar"}, False)
    assert reply == {"PoolID": "local/10.77.0.0/24", "Pool": "10.77.0.0/24", "Data": {}}


def test_missing_fields_and_null_options_mean_defaults(ipam):
    reply = ipam.request_pool(None, "10.77.0.0/24", None, None, None)
    assert reply["PoolID"] == "local/10.77.0.0/24"
    assert ipam.request_pool("", "10.77.0.0/24", "", {}, False)["PoolID"] == reply["PoolID"]


def test_unknown_address_space_is_refused(ipam):
    with pytest.raises(InvalidRequest, match="unknown address space 'elsewhere'"):
        pool(ipam, "10.77.0.0/24", space="elsewhere")


def test_global_space_is_separate_from_local(ipam):
    assert pool(ipam, "10.77.0.0/24", space="global") == "global/10.77.0.0/24"
    assert pool(ipam, "10.77.0.0/24", space="local") == "local/10.77.0.0/24"


@pytest.mark.parametrize("cidr, message", [
    ("10.77.0.1/24", r"subnet 10.77.0.1/24 has host bits set; did you mean 10.77.0.0/24\?"),
    ("10.77.0.0/33", "subnet '10.77.0.0/33' is not a valid CIDR"),
    ("banana", "subnet 'banana' is not a CIDR"),
    ("10.77.0.0/32", "subnet 10.77.0.0/32 has no assignable addresses"),
])
def test_bad_pool_is_refused(ipam, cidr, message):
    with pytest.raises(InvalidRequest, match=message):
        pool(ipam, cidr)
    assert ipam.pools() == []


def test_family_must_match_v6_flag(ipam):
    with pytest.raises(InvalidRequest, match="10.77.0.0/24 is IPv4 but the request is for an IPv6"):
        pool(ipam, "10.77.0.0/24", v6=True)
    with pytest.raises(InvalidRequest, match="fd00::/64 is IPv6 but the request is for an IPv4"):
        pool(ipam, "fd00::/64", v6=False)


@pytest.mark.parametrize("sub", ["10.78.0.0/28", "fd00::/120", "10.77.0.0/23"])
def test_sub_pool_must_be_inside_pool_and_same_family(ipam, sub):
    with pytest.raises(InvalidRequest, match=f"ip-range {sub} is not inside subnet 10.77.0.0/24"):
        pool(ipam, "10.77.0.0/24", sub)


def test_sub_pool_without_pool_is_refused(ipam):
    with pytest.raises(InvalidRequest, match="ip-range 10.77.0.0/28 needs a subnet"):
        pool(ipam, "", "10.77.0.0/28")


def test_identical_requests_share_pool_until_last_release(ipam):
    first = pool(ipam, "10.77.0.0/24", "10.77.0.128/25")
    assert pool(ipam, "10.77.0.0/24", "10.77.0.128/25") == first == "local/10.77.0.0/24/10.77.0.128/25"
    assert address(ipam, first) == "10.77.0.128/24"  # like libnetwork: only the pool's own
    assert pool_row(ipam, first)["refs"] == 2        # network/broadcast addresses are excluded
    ipam.release_pool(first)
    assert pool_row(ipam, first) == {"id": first, "space": "local", "pool": "10.77.0.0/24",
                                     "sub_pool": "10.77.0.128/25", "v6": False, "auto": False,
                                     "refs": 1, "in_use": 1}
    ipam.release_pool(first)
    assert ipam.pools() == [] and ipam.allocated(first) == []
    # Gone for good: a new pool with the same CIDR starts empty.
    assert address(ipam, pool(ipam, "10.77.0.0/24", "10.77.0.128/25")) == "10.77.0.128/24"


@pytest.mark.parametrize("cidr, sub, message", [
    ("10.77.0.0/16", "", "10.77.0.0/16 overlaps pool 10.77.0.0/24 already in use"),
    ("10.77.0.128/25", "", "10.77.0.128/25 overlaps pool 10.77.0.0/24 already in use"),
    ("10.77.0.0/24", "10.77.0.0/25",
     r"10.77.0.0/24 \(ip-range 10.77.0.0/25\) overlaps pool 10.77.0.0/24 already in use"),
])
def test_overlapping_pool_conflicts(ipam, cidr, sub, message):
    pool(ipam, "10.77.0.0/24")
    with pytest.raises(Conflict, match=message):
        pool(ipam, cidr, sub)
    assert [p["pool"] for p in ipam.pools()] == ["10.77.0.0/24"]


def test_options_are_stored_but_ignored(ipam):
    pool_id = pool(ipam, "10.77.0.0/24", options={"com.example.whatever": "1"})
    stored = ipam.store.read().execute("SELECT options FROM ipam_pools WHERE id = ?", (pool_id,))
    assert stored.fetchone()["options"] == '{"com.example.whatever": "1"}'
    with pytest.raises(InvalidRequest, match="Options must be a JSON object"):
        ipam.request_pool("local", "10.78.0.0/24", "", ["not", "a", "dict"], False)


# ---- default pools ------------------------------------------------------------------------

def test_default_pool_skips_used_blocks_and_reuses_released_ones(ipam):
    pool(ipam, "10.200.1.0/24")
    first = ipam.request_pool("local", "", "", None, False)
    assert first == {"PoolID": "local/10.200.0.0/24", "Pool": "10.200.0.0/24", "Data": {}}
    second = ipam.request_pool("local", "", "", None, False)
    assert second["Pool"] == "10.200.2.0/24"  # 10.200.1.0/24 was taken explicitly
    assert pool_row(ipam, second["PoolID"])["auto"] is True
    ipam.release_pool(first["PoolID"])
    assert ipam.request_pool("local", "", "", None, False)["Pool"] == "10.200.0.0/24"


def test_each_default_request_is_a_new_pool(ipam):
    pools = {ipam.request_pool("local", "", "", None, False)["Pool"] for _ in range(3)}
    assert pools == {"10.200.0.0/24", "10.200.1.0/24", "10.200.2.0/24"}
    assert all(p["refs"] == 1 for p in ipam.pools())


def test_explicit_request_for_an_auto_pool_conflicts(ipam):
    ipam.request_pool("local", "", "", None, False)
    with pytest.raises(Conflict, match="10.200.0.0/24 overlaps pool 10.200.0.0/24"):
        pool(ipam, "10.200.0.0/24")


def test_default_pool_exhaustion_conflicts(tmp_path):
    ipam = Ipam(Store(str(tmp_path / "s.db"), IPAM_SCHEMA), "10.200.0.0/23", 24)
    pool(ipam, "10.200.0.0/25")  # makes the first /24 unusable
    assert ipam.request_pool("local", "", "", None, False)["Pool"] == "10.200.1.0/24"
    with pytest.raises(Conflict, match="no free /24 left in the default pool 10.200.0.0/23"):
        ipam.request_pool("local", "", "", None, False)


def test_default_ipv6_pool_needs_configuration(ipam, tmp_path):
    with pytest.raises(InvalidRequest, match="no default IPv6 pool configured; pass --subnet"):
        ipam.request_pool("local", "", "", None, True)
    v6 = Ipam(Store(str(tmp_path / "v6.db"), IPAM_SCHEMA), default_supernet_v6="fd00:77::/48")
    assert v6.request_pool("local", "", "", None, True)["Pool"] == "fd00:77::/64"
    assert v6.request_pool("local", "", "", None, True)["Pool"] == "fd00:77:0:1::/64"


def test_bad_default_configuration_fails_at_start(tmp_path):
    store = Store(str(tmp_path / "s.db"), IPAM_SCHEMA)
    with pytest.raises(ValueError, match="does not fit"):
        Ipam(store, "10.200.0.0/16", 8)
    with pytest.raises(ValueError, match="not an IPv6 network"):
        Ipam(store, default_supernet_v6="10.0.0.0/8")


# ---- addresses ----------------------------------------------------------------------------

def test_unknown_pool_is_not_found(ipam):
    with pytest.raises(NotFound, match="pool local/10.9.9.0/24 not found"):
        address(ipam, "local/10.9.9.0/24")


def test_lowest_free_address_with_pool_prefix(ipam):
    pool_id = pool(ipam, "10.77.0.0/24")
    assert address(ipam, pool_id, options=GATEWAY) == "10.77.0.1/24"
    assert [address(ipam, pool_id) for _ in range(2)] == ["10.77.0.2/24", "10.77.0.3/24"]
    assert ipam.allocated(pool_id) == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]


def test_explicit_address_is_honoured_and_not_given_twice(ipam):
    pool_id = pool(ipam, "10.77.0.0/24")
    assert address(ipam, pool_id, "10.77.0.10") == "10.77.0.10/24"
    assert address(ipam, pool_id, "10.77.0.11/24") == "10.77.0.11/24"
    with pytest.raises(Conflict, match="address 10.77.0.10 is already in use in pool 10.77.0.0/24"):
        address(ipam, pool_id, "10.77.0.10")
    with pytest.raises(Conflict, match="already in use"):  # a --gateway may not take a container's IP
        address(ipam, pool_id, "10.77.0.10", GATEWAY)
    assert address(ipam, pool_id) == "10.77.0.1/24"
    assert ipam.allocated(pool_id) == ["10.77.0.1", "10.77.0.10", "10.77.0.11"]


@pytest.mark.parametrize("wanted, reason", [
    ("10.78.0.5", "is not inside"),
    ("fd00::5", "is not inside"),
    ("10.77.0.0", "is the network address of"),
    ("10.77.0.255", "is the broadcast address of"),
])
def test_unusable_explicit_address_is_refused(ipam, wanted, reason):
    pool_id = pool(ipam, "10.77.0.0/24")
    with pytest.raises(InvalidRequest, match=f"address {wanted} {reason} pool 10.77.0.0/24"):
        address(ipam, pool_id, wanted)
    assert ipam.allocated(pool_id) == []


def test_malformed_address_is_refused(ipam):
    pool_id = pool(ipam, "10.77.0.0/24")
    with pytest.raises(InvalidRequest, match="address '10.77.0.300' is not a valid IP address"):
        address(ipam, pool_id, "10.77.0.300")
    with pytest.raises(InvalidRequest, match="not a valid IP address"):
        ipam.release_address(pool_id, "nonsense")


def test_ip_range_bounds_allocation_but_not_explicit_addresses(ipam):
    pool_id = pool(ipam, "10.77.0.0/24", "10.77.0.64/30")
    assert address(ipam, pool_id, "10.77.0.5") == "10.77.0.5/24"  # --ip outside --ip-range
    got = [address(ipam, pool_id) for _ in range(4)]
    assert got == ["10.77.0.64/24", "10.77.0.65/24", "10.77.0.66/24", "10.77.0.67/24"]
    with pytest.raises(Conflict, match="no free address in ip-range 10.77.0.64/30 of pool 10.77.0.0/24"):
        address(ipam, pool_id)


def test_slash_30_exhaustion_and_lowest_first_reuse(ipam):
    pool_id = pool(ipam, "10.77.0.0/30")
    assert [address(ipam, pool_id) for _ in range(2)] == ["10.77.0.1/30", "10.77.0.2/30"]
    with pytest.raises(Conflict, match="no free address in pool 10.77.0.0/30"):
        address(ipam, pool_id)
    ipam.release_address(pool_id, "10.77.0.2")
    ipam.release_address(pool_id, "10.77.0.1/30")
    assert address(ipam, pool_id) == "10.77.0.1/30"


def test_released_addresses_are_reused_lowest_first(ipam):
    pool_id = pool(ipam, "10.77.0.0/24")
    for _ in range(8):
        address(ipam, pool_id)
    for freed in ("10.77.0.6", "10.77.0.3", "10.77.0.4"):
        ipam.release_address(pool_id, freed)
    assert [address(ipam, pool_id) for _ in range(4)] == [
        "10.77.0.3/24", "10.77.0.4/24", "10.77.0.6/24", "10.77.0.9/24"]


def test_free_ranges_merge_back_into_one(ipam):
    pool_id = pool(ipam, "10.77.0.0/29")
    for _ in range(6):
        address(ipam, pool_id)
    for freed in (2, 4, 3, 6, 1, 5):  # left, right and both-sided merges
        ipam.release_address(pool_id, f"10.77.0.{freed}")
    rows = ipam.store.read().execute("SELECT start_addr, end_addr FROM ipam_free").fetchall()
    assert [tuple(r) for r in rows] == [(f"{0x0a4d0001:032x}", f"{0x0a4d0006:032x}")]


def test_shared_gateway_is_reference_counted(ipam):
    first = pool(ipam, "10.77.0.0/24")
    assert pool(ipam, "10.77.0.0/24") == first  # a second network on the same subnet
    assert address(ipam, first, "10.77.0.1", GATEWAY) == "10.77.0.1/24"
    assert address(ipam, first, "10.77.0.1/24", GATEWAY) == "10.77.0.1/24"
    ipam.release_address(first, "10.77.0.1")
    assert ipam.allocated(first) == ["10.77.0.1"]
    with pytest.raises(Conflict, match="already in use"):  # still held: not for a container
        address(ipam, first, "10.77.0.1")
    ipam.release_address(first, "10.77.0.1")
    assert ipam.allocated(first) == []
    assert address(ipam, first) == "10.77.0.1/24"


def test_release_of_unknown_things_is_success(ipam):
    ipam.release_pool("local/10.9.9.0/24")
    ipam.release_pool(None)
    ipam.release_address("local/10.9.9.0/24", "10.9.9.1")
    pool_id = pool(ipam, "10.77.0.0/24")
    ipam.release_address(pool_id, "10.77.0.77")  # never allocated
    ipam.release_address(pool_id, "10.99.0.1")  # not even in the pool
    ipam.release_address(pool_id, "::a4d:1")  # other family, same numeric value as 10.77.0.1
    assert address(ipam, pool_id) == "10.77.0.1/24"
    ipam.release_address(pool_id, "::a4d:1")
    assert ipam.allocated(pool_id) == ["10.77.0.1"]


def test_ipv6_pool(ipam):
    pool_id = pool(ipam, "fd00:77::/64", "fd00:77::ff00/120", v6=True)
    assert pool_id == "local/fd00:77::/64/fd00:77::ff00/120"
    assert address(ipam, pool_id, options=GATEWAY) == "fd00:77::ff00/64"  # no broadcast, anycast only at ::0
    assert address(ipam, pool_id, "fd00:77::ffff:ffff:ffff:ffff") == "fd00:77::ffff:ffff:ffff:ffff/64"
    with pytest.raises(InvalidRequest, match="address fd00:77:: is the network address of pool fd00:77::/64"):
        address(ipam, pool_id, "fd00:77::")
    assert address(ipam, pool_id) == "fd00:77::ff01/64"
    assert ipam.allocated(pool_id) == ["fd00:77::ff00", "fd00:77::ff01", "fd00:77::ffff:ffff:ffff:ffff"]


def test_ipv4_slash_31_has_no_broadcast(ipam):
    pool_id = pool(ipam, "10.77.0.0/31")
    assert address(ipam, pool_id) == "10.77.0.1/31"


def test_nothing_changes_on_error(ipam):
    pool_id = pool(ipam, "10.77.0.0/30")
    address(ipam, pool_id)
    address(ipam, pool_id)
    before = (ipam.pools(), ipam.allocated(pool_id))
    with pytest.raises(Conflict):
        address(ipam, pool_id)
    with pytest.raises(Conflict):
        pool(ipam, "10.77.0.0/16")
    assert (ipam.pools(), ipam.allocated(pool_id)) == before


def test_state_survives_a_restart(tmp_path):
    path = str(tmp_path / "s.db")
    ipam = Ipam(Store(path, IPAM_SCHEMA))
    pool_id = pool(ipam, "10.77.0.0/24")
    pool(ipam, "10.77.0.0/24")
    address(ipam, pool_id, options=GATEWAY)
    address(ipam, pool_id, "10.77.0.20")
    ipam.store.close()
    again = Ipam(Store(path, IPAM_SCHEMA))
    assert pool_row(again, pool_id)["refs"] == 2
    assert again.allocated(pool_id) == ["10.77.0.1", "10.77.0.20"]
    assert address(again, pool_id) == "10.77.0.2/24"
    with pytest.raises(Conflict):
        address(again, pool_id, "10.77.0.20")


# ---- scale and concurrency ----------------------------------------------------------------

def work_for_one_allocation(ipam, pool_id):
    """SQL statements and SQLite VM steps spent on one automatic allocation."""
    conn, statements, steps = ipam.store.read(), [], [0]

    def count_step():
        steps[0] += 1
        return 0

    conn.set_trace_callback(statements.append)
    conn.set_progress_handler(count_step, 1)
    try:
        address(ipam, pool_id)
    finally:
        conn.set_trace_callback(None)
        conn.set_progress_handler(None, 1)
    return len(statements), steps[0]


def fill(ipam, pool_id, count):
    for _ in range(count):
        address(ipam, pool_id)


def test_allocation_cost_does_not_grow_with_addresses_in_use(tmp_path):
    ipam = Ipam(Store(str(tmp_path / "s.db"), IPAM_SCHEMA))
    ipam.store.read().execute("PRAGMA synchronous=OFF")  # test speed only: 5,000 commits
    small, large = pool(ipam, "10.77.0.0/16"), pool(ipam, "10.78.0.0/16")
    fill(ipam, small, 10)
    fill(ipam, large, 5000)
    assert work_for_one_allocation(ipam, small) == work_for_one_allocation(ipam, large)
    # Fragmented: every other address freed, so there are 5 free ranges vs 2,500 before the top.
    for n in range(1, 12, 2):
        ipam.release_address(small, f"10.77.0.{n}")
    for n in range(1, 5001, 2):
        ipam.release_address(large, f"10.78.{n // 256}.{n % 256}")
    assert work_for_one_allocation(ipam, small) == work_for_one_allocation(ipam, large)


def allocate_in_child(path, pool_id, barrier, results):
    ipam = Ipam(Store(path, IPAM_SCHEMA))
    barrier.wait()
    results.put([address(ipam, pool_id) for _ in range(100)])


def test_two_processes_never_get_the_same_address(tmp_path):
    path = str(tmp_path / "s.db")
    pool_id = pool(Ipam(Store(path, IPAM_SCHEMA)), "10.77.0.0/16")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=allocate_in_child, args=(path, pool_id, barrier, results))
                for _ in range(2)]
    for child in children:
        child.start()
    got = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    everything = {a.split("/")[0] for a in got[0] + got[1]}
    lowest_200 = {f"10.77.0.{n}" for n in range(1, 201)}
    assert len(got[0] + got[1]) == 200 and everything == lowest_200
    assert set(Ipam(Store(path, IPAM_SCHEMA)).allocated(pool_id)) == lowest_200
