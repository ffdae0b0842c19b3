"""Test-only helpers for the two-node Ray cluster on one machine (tests/integration/test_two_nodes.py).

- `LoopbackWatch`: a thread that samples, every `period` seconds, the TCP connections of every process
  under the given roots (the `ray start` of each node: GCS, raylets, Ray's agents, drivers, actors, the
  processes they start) and of extra processes the test launches, and records every connection whose local or
  remote address is outside 127.0.0.0/8 (an IPv4-mapped IPv6 loopback, ::ffff:127.x, counts as loopback).
  Listening sockets are not connections: their bind addresses are only collected. It also records the process titles seen under each root, so a test can tell which node ran what (Ray
  titles its workers `ray::ClassName...`).
- `alive_nodes`: the IPs of the cluster's alive nodes, from the dashboard's State API (HTTP, no driver).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.request
from collections import defaultdict

import psutil


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


class LoopbackWatch:
    """Samples the connections of every process below `roots` ({name: psutil.Process or pid})."""

    def __init__(self, roots: dict[str, int], period: float = 0.5):
        self.roots = dict(roots)
        self.period = period
        self.violations: list[tuple[str, str, str, str]] = []  # (process title, local, remote, status)
        self.connections_seen = 0
        self.listening: set[str] = set()  # bind addresses of listening sockets (reported, not judged)
        self.wildcard_listeners: set[tuple[str, str, int]] = set()  # (process, address, port) not on loopback
        self.titles: dict[str, set[str]] = defaultdict(set)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="loopback-watch", daemon=True)

    def add_root(self, name: str, pid: int) -> None:
        with self._lock:
            self.roots[name] = pid

    def start(self) -> LoopbackWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()  # one last look

    def _processes(self) -> dict[int, tuple[str, str]]:
        """{pid: (root name, title)} of every process below the roots."""
        with self._lock:
            roots = dict(self.roots)
        found: dict[int, tuple[str, str]] = {}
        for name, pid in roots.items():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for p in procs:
                try:
                    title = " ".join(p.cmdline())[:120] or p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                found[p.pid] = (name, title)
        return found

    def sample(self) -> None:
        procs = self._processes()
        for name, title in procs.values():
            self.titles[name].add(title)
        try:
            conns = psutil.net_connections(kind="inet")
        except psutil.AccessDenied:  # pragma: no cover - the tests run as a user who can read /proc
            conns = []
        for c in conns:
            if c.pid not in procs:
                continue
            if not c.raddr:  # a listening (or unconnected) socket: not a connection, its bind address noted
                if c.laddr:
                    self.listening.add(c.laddr.ip)
                    if not is_loopback(c.laddr.ip):
                        self.wildcard_listeners.add((procs[c.pid][1][:60], c.laddr.ip, c.laddr.port))
                continue
            self.connections_seen += 1
            if not (is_loopback(c.laddr.ip) and is_loopback(c.raddr.ip)):
                self.violations.append((procs[c.pid][1], f"{c.laddr}", f"{c.raddr}", c.status))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def ran_on(self, name: str, needle: str) -> bool:
        """Whether a process whose title contains `needle` was seen under root `name`."""
        return any(needle in t for t in self.titles[name])


def alive_nodes(dashboard: str) -> list[str]:
    """IPs of the alive nodes, from the dashboard's State API."""
    with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=100", timeout=10) as resp:
        data = json.load(resp)
    return sorted(n["node_ip"] for n in data["data"]["result"]["result"] if n["state"] == "ALIVE")


def wait_for_nodes(dashboard: str, ips: list[str], timeout: float = 120) -> None:
    """Until exactly `ips` are the alive nodes (a restarted node replaces its dead entry)."""
    deadline = time.monotonic() + timeout
    last: list[str] = []
    while time.monotonic() < deadline:
        try:
            last = alive_nodes(dashboard)
        except OSError:
            last = []
        if last == sorted(ips):
            return
        time.sleep(0.5)
    raise TimeoutError(f"alive nodes {last}, wanted {sorted(ips)} after {timeout} s")
