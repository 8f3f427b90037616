"""One iperf3 TCP measurement between two network namespaces (the host's iperf3 binary)."""
from __future__ import annotations

import json
import subprocess
import time


def tcp_mbit(server_ns: str, client_ns: str, address: str, port: int, *, seconds: int = 3,
             timeout: float = 60.0, settle: float = 0.3) -> float:
    """Mbit/s received (TCP goodput, first second omitted) from ``client_ns`` to an iperf3 server
    on ``address`` in ``server_ns``; the one-shot server is waited for in every case."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(settle)
        out = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", address, "-p", str(port),
                              "-t", str(seconds), "-O", "1", "-J"], capture_output=True, text=True,
                             timeout=timeout)
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert out.returncode == 0, f"iperf3 to {address}: {out.stderr} {out.stdout[-300:]}"
    return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
