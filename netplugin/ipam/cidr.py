"""Parsing of IPAM request fields and the address arithmetic built on them.

Addresses are stored as 32-character lowercase hex TEXT for both families: SQLite's INTEGER is a
signed 64-bit value and cannot hold an IPv6 address, while fixed-width hex sorts numerically as
text, so ORDER BY and range comparisons in SQL stay correct.
"""
import ipaddress

from plugincore.errors import InvalidRequest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ADDRESS_SPACES = ("local", "global")


def to_key(value: int) -> str:
    return f"{value:032x}"


def from_key(key: str, v6: bool) -> Address:
    # ip_address(int) would guess the family from the magnitude; the pool knows it.
    return ipaddress.IPv6Address(int(key, 16)) if v6 else ipaddress.IPv4Address(int(key, 16))


def text_field(value, field: str) -> str:
    """Docker may omit a field or send null: both mean empty."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a string, got {value!r}")
    return value.strip()


def options_field(value) -> dict:
    """Docker sends Options as null for `docker run --ip`: treat it as no options."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"Options must be a JSON object, got {value!r}")
    return value


def parse_space(value) -> str:
    space = text_field(value, "AddressSpace") or "local"
    if space not in ADDRESS_SPACES:
        raise InvalidRequest(f"unknown address space {space!r}: this driver serves 'local' and 'global'")
    return space


def parse_network(value: str, what: str) -> Network:
    """A CIDR with a prefix length and no host bits (strict, like Docker's own --subnet check)."""
    if "/" not in value:
        raise InvalidRequest(f"{what} {value!r} is not a CIDR (expected e.g. 10.77.0.0/24)")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise InvalidRequest(f"{what} {value!r} is not a valid CIDR (expected e.g. 10.77.0.0/24)") from None
    raise InvalidRequest(f"{what} {value} has host bits set; did you mean {loose}?")


def parse_pool(pool: str, sub_pool: str, v6: bool) -> tuple[Network, Network | None]:
    """The pool and optional sub-pool (docker --ip-range) of a RequestPool call, validated."""
    net = parse_network(pool, "subnet")
    if (net.version == 6) != v6:
        wanted = 6 if v6 else 4
        raise InvalidRequest(f"subnet {net} is IPv{net.version} but the request is for an IPv{wanted} pool")
    if usable_range(net) is None:
        raise InvalidRequest(f"subnet {net} has no assignable addresses")
    if not sub_pool:
        return net, None
    sub = parse_network(sub_pool, "ip-range")
    if sub.version != net.version or not sub.subnet_of(net):
        raise InvalidRequest(f"ip-range {sub} is not inside subnet {net}")
    return net, sub


def parse_address(value: str) -> Address:
    """A plain address; Docker may send "a.b.c.d" or "a.b.c.d/len" (the length is not used)."""
    try:
        return ipaddress.ip_interface(value).ip
    except ValueError:
        raise InvalidRequest(f"address {value!r} is not a valid IP address") from None


def usable_range(net: Network) -> tuple[int, int] | None:
    """First and last assignable address as integers, or None when there is none.

    Never the network address (for IPv6 the subnet-router anycast address) and never the IPv4
    broadcast address; /31 (RFC 3021) has no broadcast address, IPv6 has none at all.
    """
    first = int(net.network_address) + 1
    last = int(net.broadcast_address)
    if net.version == 4 and net.prefixlen < 31:
        last -= 1
    return (first, last) if first <= last else None


def allocation_range(net: Network, sub: Network | None) -> tuple[int, int]:
    """Where automatic allocation may pick from: the sub-pool's part of the usable range."""
    first, last = usable_range(net)
    if sub is not None:
        first = max(first, int(sub.network_address))
        last = min(last, int(sub.broadcast_address))
    return first, last


def check_assignable(address: Address, net: Network) -> None:
    """An explicit address must be usable in the pool; it may lie outside the sub-pool (Docker
    allows --ip outside --ip-range)."""
    first, last = usable_range(net)
    if address.version == net.version and first <= int(address) <= last:
        return
    if address.version != net.version or address not in net:
        reason = "is not inside"
    elif address == net.network_address:
        reason = "is the network address of"
    else:
        reason = "is the broadcast address of"
    raise InvalidRequest(f"address {address} {reason} pool {net}")


def lowest_free_block(supernet: Network, prefix: int, taken: list[tuple[int, int]]) -> Network | None:
    """The lowest /prefix block of supernet that overlaps none of the taken (start, end) ranges.

    Walks the taken ranges in order instead of every candidate block, so a large IPv6 supernet
    with few pools costs as little as an IPv4 one.
    """
    size = 1 << (supernet.max_prefixlen - prefix)
    candidate = int(supernet.network_address)
    for start, end in sorted(taken):
        if end < candidate:
            continue
        if start > candidate + size - 1:
            break
        candidate = (end + 1 + size - 1) // size * size  # next block boundary after this range
    if candidate + size - 1 > int(supernet.broadcast_address):
        return None
    return type(supernet)((candidate, prefix))


def default_block(supernet: str | None, prefix: int, version: int) -> tuple[Network, int] | None:
    """Validate the configured default supernet and prefix: a bad configuration is a ValueError."""
    if supernet is None:
        return None
    net = ipaddress.ip_network(supernet, strict=True)
    if net.version != version:
        raise ValueError(f"default IPv{version} supernet {net} is not an IPv{version} network")
    if not net.prefixlen <= prefix < net.max_prefixlen:
        raise ValueError(f"default prefix /{prefix} does not fit in supernet {net}")
    return net, prefix
