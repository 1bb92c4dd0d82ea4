"""A page-fault handler for the Uffd snapshot backend, as Firecracker's example handlers work:
it listens on a Unix socket, receives the VMM's userfaultfd and the region mappings (JSON),
maps the snapshot's memory file and answers every missing-page fault with UFFDIO_COPY of that
page from the file.  A UFFD_EVENT_REMOVE message (the balloon's MADV_DONTNEED) marks its pages
removed: a later fault there gets a page of zeros, never the stale file contents.  Any other
event is an error (the VMM enables no other).  Runs as a thread of the test process (the VMM is
another process)."""

from __future__ import annotations

import array
import ctypes
import json
import mmap
import os
import select
import socket
import struct
import threading

from asyncvmm.snapshot.uffd import PAGE_SIZE, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE, copy_page

UFFD_MSG_SIZE = 32


class PageFaultHandler(threading.Thread):
    def __init__(self, sock_path: str, mem_file: str) -> None:
        super().__init__(daemon=True, name="uffd-handler")
        self.sock_path, self.mem_file = sock_path, mem_file
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(sock_path)
        self.listener.listen(1)
        self.stop_event = threading.Event()
        self.mappings: list[dict] = []
        self.faults = 0
        self.zero_faults = 0                 # faults answered with zeros (removed pages)
        self.removes: list[tuple[int, int]] = []     # (start, end) of each UFFD_EVENT_REMOVE
        self.removed: set[int] = set()      # page addresses removed at least once
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as e:       # reported by the test
            self.error = e

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        fds = array.array("i")
        msg, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:4])
        conn.close()
        uffd = fds[0]
        self.mappings = json.loads(msg)
        with open(self.mem_file, "rb") as f:
            src = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        src_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
        largest = max((m.get("page_size", PAGE_SIZE) for m in self.mappings), default=PAGE_SIZE)
        zeros = mmap.mmap(-1, largest)
        zeros_addr = ctypes.addressof(ctypes.c_char.from_buffer(zeros))
        poller = select.poll()
        poller.register(uffd, select.POLLIN)
        while not self.stop_event.is_set():
            if not poller.poll(100):
                continue
            try:
                data = os.read(uffd, UFFD_MSG_SIZE * 16)
            except BlockingIOError:
                continue
            for off in range(0, len(data), UFFD_MSG_SIZE):
                event = data[off]
                if event == UFFD_EVENT_REMOVE:
                    self._remove(*struct.unpack_from("<QQ", data, off + 8))
                elif event == UFFD_EVENT_PAGEFAULT:
                    (address,) = struct.unpack_from("<Q", data, off + 16)
                    self._fault(uffd, address, src_addr, zeros_addr)
                else:
                    raise RuntimeError(f"unexpected userfaultfd event {event:#x}")

    def _mapping(self, address: int) -> dict:
        for m in self.mappings:
            if m["base_host_virt_addr"] <= address < m["base_host_virt_addr"] + m["size"]:
                return m
        raise RuntimeError(f"userfaultfd message for {address:#x}, outside every mapping")

    def _remove(self, start: int, end: int) -> None:
        # the range's pages are gone from the VMM (MADV_DONTNEED); from now on their content
        # is zeros, as for any anonymous page the guest gave back, not the snapshot's
        self.removes.append((start, end))
        page_size = self._mapping(start).get("page_size", PAGE_SIZE)
        self.removed.update(range(start & ~(page_size - 1), end, page_size))

    def _fault(self, uffd: int, address: int, src_addr: int, zeros_addr: int) -> None:
        m = self._mapping(address)
        base, page_size = m["base_host_virt_addr"], m.get("page_size", PAGE_SIZE)
        page = address & ~(page_size - 1)
        if page in self.removed:
            copy_page(uffd, page, zeros_addr, page_size)
            self.zero_faults += 1
        else:
            copy_page(uffd, page, src_addr + m["offset"] + page - base, page_size)
        self.faults += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)
        self.listener.close()
