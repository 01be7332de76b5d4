"""Hosts made of Linux network namespaces, and partitions made by pulling their cables.

One namespace is the server host: it holds a bridge (the switch) with the server address
``10.231.0.1/24``. Every other host is a namespace with one veth link whose far end is
plugged into that bridge. Cutting a host sets its switch port down: the host keeps its
address and its processes, but nothing it sends arrives and nothing reaches it (both sides
see silence, as with a pulled cable -- no RST, no ICMP). Healing sets the port up again.

Names carry the pid of the test process (``mh<pid>x<hex>...``) so concurrent sessions never
clash and a later session can remove what a killed one left behind (``sweep_orphans``).
Nothing is created in the machine's own namespace: the test process enters the server host
with ``entered`` (``setns`` on the calling thread) to observe.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

SUBNET = "10.231.0"
SERVER_ADDR = f"{SUBNET}.1"
CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"^mh(\d+)x[0-9a-f]+")


def ip(*args: str) -> str:
    """Run ``ip ARGS``; raises with its stderr on failure."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


@dataclass
class Host:
    """One namespace on the switch."""

    role: str
    ns: str
    addr: str
    port: str  # its switch port, in the server namespace

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.ns, *argv]


class Network:
    """A server host with a switch, and hosts plugged into it."""

    def __init__(self) -> None:
        self.prefix = f"mh{os.getpid()}x{uuid.uuid4().hex[:6]}"
        self.hosts: dict[str, Host] = {}
        self.cuts: dict[str, str] = {}  # role -> how it is cut now
        srv = f"{self.prefix}srv"
        ip("netns", "add", srv)
        self.server = Host("server", srv, SERVER_ADDR, "")
        self.hosts["server"] = self.server
        ip("-n", srv, "link", "set", "lo", "up")
        ip("-n", srv, "link", "add", "br0", "type", "bridge")
        ip("-n", srv, "addr", "add", f"{SERVER_ADDR}/24", "dev", "br0")
        ip("-n", srv, "link", "set", "br0", "up")

    def add_host(self, role: str) -> Host:
        """A new host namespace wired to the switch, with the next free address."""
        ns = f"{self.prefix}{role}"
        addr = f"{SUBNET}.{10 + len(self.hosts)}"
        port = f"p{role}"[:15]
        ip("netns", "add", ns)
        self.hosts[role] = host = Host(role, ns, addr, port)
        ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
           "netns", self.server.ns)
        ip("-n", self.server.ns, "link", "set", port, "master", "br0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        return host

    def cut(self, host: Host, how: str = "link") -> None:
        """Cut the host off. ``link``: pull its cable (its switch port goes down; both
        sides hear silence). ``blackhole``: each side routes the other's address into a
        blackhole (packets are dropped as they are sent, so new connections fail at once)."""
        if how == "link":
            ip("-n", self.server.ns, "link", "set", host.port, "down")
        elif how == "blackhole":
            ip("-n", host.ns, "route", "add", "blackhole", f"{SERVER_ADDR}/32")
            ip("-n", self.server.ns, "route", "add", "blackhole", f"{host.addr}/32")
        else:
            raise ValueError(f"unknown cut {how!r}")
        self.cuts[host.role] = how

    def heal(self, host: Host) -> None:
        """Undo the host's cut."""
        how = self.cuts.pop(host.role, None)
        if how == "link":
            ip("-n", self.server.ns, "link", "set", host.port, "up")
        elif how == "blackhole":
            ip("-n", host.ns, "route", "del", "blackhole", f"{SERVER_ADDR}/32")
            ip("-n", self.server.ns, "route", "del", "blackhole", f"{host.addr}/32")

    def destroy(self) -> None:
        """Kill whatever still runs in our namespaces, then delete them (links go with them)."""
        for host in reversed(list(self.hosts.values())):
            remove_namespace(host.ns)


def remove_namespace(ns: str) -> None:
    """SIGKILL every process left in ``ns``, then delete it; quiet when it is gone."""
    try:
        pids = ip("netns", "pids", ns).split()
    except RuntimeError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(RuntimeError):
        ip("netns", "del", ns)


def sweep_orphans() -> list[str]:
    """Delete namespaces an earlier, killed session of this harness left behind (their
    creator pid is gone); a running session's namespaces are never touched."""
    removed = []
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NAME.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            remove_namespace(name)
            removed.append(name)
    return removed


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the calling thread (and threads it starts) inside ``ns``: sockets opened meanwhile
    live there for good. Returns to the original namespace afterwards."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def available() -> str | None:
    """Why this machine cannot run the harness (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    try:
        ip("netns", "list")
    except (OSError, RuntimeError) as e:
        return f"`ip netns` unavailable: {e}"
    return None
