"""Watch this network namespace's links with rtnetlink (pyroute2): a snapshot, then every change.

The eBPF source attaches its TC programs to pod veths as they appear and forgets them as they go.
pyroute2 (0.9) reads its socket on an asyncio loop; its synchronous wrapper buffers messages out of
sight of ``select()`` (measured: after a veth was created, deleted, the DELLINK never reached a
select loop), so the watcher runs an ``AsyncIPRoute`` on its own thread and hands link changes to
the agent's thread through a queue plus a pipe whose read end the agent's selector watches.

Subscribing comes before the snapshot, so no change falls between them: a link may show up both in
the snapshot and as a "new" event, and consumers treat "new" as idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

ARPHRD_ETHER = 1
IFF_UP = 0x1
RTM_NEWLINK, RTM_DELLINK = 16, 17
AF_UNSPEC = 0


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND: "veth", "bridge", "vxlan", ...; None for a physical NIC
    arphrd: int  # link type (ARPHRD_ETHER = 1)
    master: int  # ifindex of the bridge/bond it is enslaved to, 0 if none
    up: bool

    @property
    def ethernet(self) -> bool:
        return self.arphrd == ARPHRD_ETHER

    @property
    def bridge(self) -> bool:
        return self.kind == "bridge"


LinkEvent = tuple[Literal["new", "del"], Link]


def parse_link(msg: Any) -> Link:
    """A pyroute2 ifinfmsg as a Link."""
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return Link(
        index=int(msg["index"]),
        name=str(msg.get_attr("IFLA_IFNAME") or ""),
        kind=kind,
        arphrd=int(msg["ifi_type"]),
        master=int(msg.get_attr("IFLA_MASTER") or 0),
        up=bool(msg["flags"] & IFF_UP),
    )


class LinkWatcher:
    """``start()`` returns the current links; afterwards ``fileno()`` turns readable whenever
    ``events()`` has changes to hand out. ``close()`` stops the thread."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[LinkEvent | BaseException] = queue.SimpleQueue()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._snapshot: list[Link] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.events_seen = 0

    def start(self, timeout: float = 10.0) -> list[Link]:
        self._thread = threading.Thread(target=self._run, name="otelflow-links", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise OSError(f"rtnetlink: no link list within {timeout:.0f} s")
        if self._error is not None:
            err = self._error
            self.close()
            raise OSError(f"rtnetlink: cannot watch links: {err}") from err
        return list(self._snapshot)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self._main())
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
        finally:
            loop.close()

    async def _main(self) -> None:
        from pyroute2 import AsyncIPRoute

        try:
            async with AsyncIPRoute() as ipr:
                await ipr.bind()  # RTMGRP_LINK among the default groups
                self._snapshot = [parse_link(m) async for m in await ipr.get_links()]
                self._ready.set()
                while True:
                    async for m in ipr.get():
                        t = m["header"]["type"]
                        # AF_BRIDGE messages describe bridge-port state, and their DELLINK means
                        # "left the bridge", not "gone": only the link family's messages count
                        if t in (RTM_NEWLINK, RTM_DELLINK) and m["family"] == AF_UNSPEC:
                            self._put(("new" if t == RTM_NEWLINK else "del", parse_link(m)))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # reported: at start() or as an event
            if not self._ready.is_set():
                self._error = e
                self._ready.set()
            else:
                self._put(e)

    def _put(self, item: LinkEvent | BaseException) -> None:
        self._q.put(item)
        with contextlib.suppress(OSError):
            os.write(self._wfd, b"x")

    def fileno(self) -> int:
        return self._rfd

    def events(self) -> list[LinkEvent]:
        """Every change since the last call (oldest first). Raises OSError if the watcher died."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._rfd, 4096):
                pass
        out: list[LinkEvent] = []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                raise OSError(f"rtnetlink link watcher stopped: {item}") from item
            out.append(item)
        self.events_seen += len(out)
        return out

    def close(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._rfd = self._wfd = -1
