"""Forward TCP from each floating IP to the fixed IP Neutron associated it with.

The harness's L3 plugin writes {floating address: fixed address} to a JSON file on every
floating-IP change; this process listens on each floating address (loopback, 127.43.0.0/24)
and connects every new client to the current fixed address — the L3 agent's DNAT, in user
space. A connection keeps the backend it started with (like conntrack), so re-pointing the
floating IP never cuts a request in flight.

usage: python -m localcloud.openstack.fipforward MAP_FILE  (ports: MODELSERVE_OS_FIP_PORTS, 8080)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys


async def _pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - closing a dead socket
            pass


class Forwarder:
    """Listeners per (floating address, port), targets looked up per connection."""

    def __init__(self, map_file: str, ports: list[int]):
        self.map_file = map_file
        self.ports = ports
        self.mapping: dict[str, str] = {}
        self.servers: dict[tuple[str, int], asyncio.base_events.Server] = {}
        self.mtime = None

    def _load(self):
        try:
            st = os.stat(self.map_file)
        except FileNotFoundError:
            return {}
        if st.st_mtime_ns == self.mtime:
            return self.mapping
        self.mtime = st.st_mtime_ns
        try:
            with open(self.map_file) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            self.mtime = None
            return self.mapping

    async def _handle(self, fip, port, reader, writer):
        target = self.mapping.get(fip)
        if not target:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(target, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def run(self):
        while True:
            self.mapping = self._load()
            wanted = {(fip, port) for fip in self.mapping for port in self.ports}
            for key in list(self.servers):
                if key not in wanted:
                    self.servers.pop(key).close()
            for fip, port in wanted - set(self.servers):
                try:
                    self.servers[(fip, port)] = await asyncio.start_server(
                        lambda r, w, fip=fip, port=port: self._handle(fip, port, r, w),
                        fip, port, reuse_address=True)
                except OSError as exc:
                    print(f"cannot listen on {fip}:{port}: {exc}", file=sys.stderr,
                          flush=True)
            await asyncio.sleep(0.05)  # a stat() per tick: the switch lands within 50 ms


def main():
    """Run until SIGTERM."""
    ports = [int(p) for p in os.environ.get("MODELSERVE_OS_FIP_PORTS", "8080").split(",")]
    loop = asyncio.new_event_loop()
    task = loop.create_task(Forwarder(sys.argv[1], ports).run())
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass


if __name__ == "__main__":
    main()
