"""The agent's result spool: the unacknowledged results, kept on disk so that an outage of
the coordinator or a restart of the agent does not lose them.

A ``Spool`` is a result store (``agent.buffer.ResultStore``, like the in-memory
``ResultBuffer``): the scheduler adds every result, numbered ``next_seq``; the link reads
them oldest first (``take_unsent``) and forgets them once the coordinator acknowledges
them (``ack``, also with ``Welcome.last_seq``). After a reconnect (``rewind``) everything
unacknowledged is sent again, in sequence order, from disk where it is no longer in
memory, while new results keep arriving behind it.

Lifecycle: ``Spool(directory, ...)`` (locks the directory; ``SpoolError``, one line,
when it cannot), ``await spool.run()`` in the agent's task group (flushes every
``flush_interval``), and ``close()`` when the agent stops (a last flush, then the lock is
released). What survives in the directory::

    lock           fcntl.flock'ed while an agent has the spool open (holds its pid)
    id             the spool's random id, made once: the agent's Hello.instance_id, so
                   the coordinator's Welcome.last_seq is about this spool's numbering
    state.json     next_seq, the first result still wanted, results dropped so far
    <seq>.log      segments of the log, named by the first sequence number they hold

**Durability.** Results are written in batches, once every ``flush_interval`` (default
1 s), with one ``write`` per segment touched; only results still unacknowledged at that
moment are written (connected, most were acknowledged within the batch interval). A
``write`` is in the kernel once it returns, so ``kill -9`` (or a crash, or the OOM killer)
loses at most the results of the last flush interval. ``fdatasync`` runs, on a worker
thread so that a slow disk never stalls the probes, after a flush that finds results
written by an earlier flush still unacknowledged (the coordinator is slow or gone); so a
power loss loses about two flush intervals at most, and a connected agent whose results
are acknowledged quickly does not sync at all: its short-lived segments are usually
deleted before the kernel writes them back. ``state.json`` is replaced (write, rename) at
every flush without a sync: after a power loss it may be a flush behind, which costs a
result sent again at worst (the coordinator recognises it by its sequence number).
Sequence numbers never go backwards past what the coordinator saw: a ``Welcome.last_seq``
at or above ``next_seq`` (results it received but the spool lost) moves ``next_seq`` past
it.

**Bounds.** On disk, ``max_bytes`` (default 256 MiB) across the segments, each at most a
32nd of that (8 MiB at most): when a flush takes the spool past the bound, its oldest
segments are deleted and their unacknowledged results counted in ``dropped``
(cumulative, persisted, reported to the coordinator in every batch and heartbeat as
AgentCounters.results_dropped, and logged as a warning at most every
``DROP_LOG_PERIOD`` with the count). In memory, after each flush, the newest
``memory_results`` (default 10,000: a second at 10,000 results/s, about 4 MB), and then
those added until the next flush, which comes early once they reach
``EARLY_FLUSH_FACTOR`` times ``memory_results``: at most 60,000 results, about 25 MB,
whatever the rate or the backlog. That is enough for a connected agent to send
everything from memory, while a backlog of millions is read back from disk a batch at
a time. A write that fails (a full disk) keeps results in memory within the same bound,
dropping the oldest, and is retried at every flush.

**Recovery.** Each record (up to ``CHUNK_RESULTS`` results, one protobuf ResultBatch)
carries its length, sequence range and a CRC-32. Opening validates the newest segment
record by record and cuts it after the last valid one (a torn write); an unreadable
record in an older segment is found when the replay reaches it, and the rest of that
segment is skipped. Either way a warning says how many results were lost; they are
counted in ``dropped``, and everything valid before them is kept. A directory that cannot
be created, written or locked, or a path that is not a directory, is a ``SpoolError``.

**Why a segment log, not SQLite.** Both were prototyped and measured by
``tests/bench/bench_spool.py`` on 2026-12-07 (``lscpu``: 2 cores, Intel(R) Xeon(R)
Processor, KVM; virtio disk; CPython 3.11.7, SQLite 3.40.1; rerun it to compare). The
SQLite candidate: WAL, one row per result (``seq`` primary key), one transaction per
flush, synchronous=FULL for the same durability; both write only what is unacknowledged
at a flush. HTTP results, 10,000 a second:

=============================================  ==============  ==============
                                               segment log     SQLite WAL
=============================================  ==============  ==============
connected (acked within 0.2 s), CPU/result     0.89 us         1.05 us
  (memory only, ``ResultBuffer``: 0.19 us)
backlog (coordinator gone), CPU/result         3.0 us          4.2 us
backlog, results/s one core spools             322,000         228,000
longest flush of 10,000 (on the event loop)    36 ms           51 ms
disk per result                                98 B            112.5 B
disk once 1M spooled results are acked         0 B             119 MB, kept
reopen with 1M spooled, to the first batch     13 ms           82 ms
replay from disk, results/s                    313,000         244,000
=============================================  ==============  ==============

The log costs less CPU on the path every result takes, gives its space back as soon as
the coordinator acknowledges (a SQLite file keeps its high-water mark until a VACUUM
rewrites it), drops the oldest results by deleting a file, syncs off the event loop,
and recovers from a torn write by cutting a record rather than from a "malformed
database" by starting over. SQLite's strengths, exact per-result bounds and less code of
our own, do not outweigh that.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import struct
import threading
import time
import uuid
import zlib
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from pathlib import Path

from vantage.logs import get_logger
from vantage.results import ProbeResult
from vantage.wire import WireError, result_from_pb, results_to_pb
from vantage_proto.v1 import agent_pb2

from .buffer import wait_grown
from .errors import FatalError

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_SPOOL_BYTES",
    "MIN_SPOOL_BYTES",
    "Spool",
    "SpoolError",
]

DEFAULT_SPOOL_BYTES = 256 << 20
MIN_SPOOL_BYTES = 64 << 10
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_MEMORY_RESULTS = 10_000
EARLY_FLUSH_FACTOR = 5
MAX_SEGMENT_BYTES = 8 << 20
CHUNK_RESULTS = 1_000
DROP_LOG_PERIOD = 10.0

# A record: magic, payload length, CRC-32 of (first seq, count, payload), first seq,
# count; then the payload, a serialised agent_pb2.ResultBatch of seqs first..first+count-1.
_HEADER = struct.Struct("<4sIIQI")
_MAGIC = b"VSR1"
_RANGE = struct.Struct("<QI")
_MAX_PAYLOAD = 64 << 20
_SEGMENT_SUFFIX = ".log"
_STATE = "state.json"
_ID = "id"
_LOCK = "lock"
_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class SpoolError(FatalError):
    """The spool directory cannot be used (not a directory, not writable, locked by
    another agent): one line saying which and why; the agent does not start."""


class _Segment:
    """One file of the log: the first sequence number it holds, its size, and (for the
    newest, which is read to its end on open, or written to) one past its last."""

    __slots__ = ("end", "first", "path", "readable", "size")

    def __init__(self, path: Path, first: int, size: int, end: int | None = None) -> None:
        self.path = path
        self.first = first
        self.size = size
        self.end = end
        self.readable: int | None = None  # bytes before a bad record found in it


class Spool:
    """Unacknowledged results in sequence order, on disk under one directory.

    The results wanted are the sequence numbers ``[first, next_seq)``: those at or below
    the coordinator's acknowledgement, and those dropped for the bound, are gone.
    ``in_flight`` are sent on the current stream, ``unsent`` are not. Single consumer:
    one sender at a time may wait in ``wait_unsent``. Not thread-safe: everything but
    the fsync worker runs on the event loop.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_SPOOL_BYTES,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        memory_results: int = DEFAULT_MEMORY_RESULTS,
        agent: str = "",
        region: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open (creating it if need be) and lock the spool in ``directory`` until
        ``close``. SpoolError when the directory cannot be used."""
        if max_bytes < MIN_SPOOL_BYTES:
            raise ValueError(f"a spool needs at least {MIN_SPOOL_BYTES} bytes, not {max_bytes}")
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be positive, not {flush_interval}")
        if memory_results < 1:
            raise ValueError(f"memory_results must be positive, not {memory_results}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self._memory_results = memory_results
        self._early_flush = EARLY_FLUSH_FACTOR * memory_results
        self._segment_bytes = min(MAX_SEGMENT_BYTES, max_bytes // 32)
        self._chunk_results = max(1, min(CHUNK_RESULTS, self._segment_bytes // 256))
        self._clock = clock
        self._log = get_logger("agent.spool").bind(agent=agent, region=region, spool=str(directory))
        self.next_seq = 1
        self.dropped = 0
        self._first = 1  # lowest sequence number still wanted
        self._sent = 1  # next sequence number to send on the current stream
        self._flushed = 1  # every result below this is on disk, acknowledged or dropped
        # In memory: the results [next_seq - len(both), next_seq), split at _sent when
        # _sent falls inside them; older wanted results are on disk only.
        self._mem_sent: deque[ProbeResult] = deque()
        self._mem_unsent: deque[ProbeResult] = deque()
        self._pending: list[ProbeResult] = []  # added since the last flush, in order
        self._grew = asyncio.Event()
        self._segments: list[_Segment] = []
        self._disk_bytes = 0
        self._active: int | None = None  # fd of the segment being written: the newest
        self._closed = False
        self._write_failed = False
        self._saved_state: tuple[int, int, int] | None = None
        # fsync bookkeeping: everything below _synced is on stable storage (or not wanted).
        self._synced = 1
        self._dir_dirty = False
        self._unsynced_fds: list[int] = []  # sealed segments with data not yet synced
        self._retired_fds: list[int] = []  # to close once no sync is running
        self._sync_done = threading.Event()
        self._sync_done.set()
        self._sync_error: OSError | None = None
        # Reading back: the open segment and where the last record read ended.
        self._reader: tuple[_Segment, int] | None = None
        self._read_offset = 0
        self._read_next = 0  # the first seq after the record that ends at _read_offset
        self._chunk: tuple[int, list[ProbeResult]] | None = None  # the last record decoded
        self._lost_upto = 0  # holes below this are counted already
        self._dropped_unlogged = 0
        self._drop_logged_at = -float("inf")
        self._lock_fd = -1
        self._dir_fd = -1
        self.id = ""
        self._open()

    # -- the ResultStore interface ------------------------------------------------------

    def __len__(self) -> int:
        return self.next_seq - self._first

    @property
    def in_flight(self) -> int:
        """Results sent on the current stream and not yet acknowledged."""
        return max(0, self._sent - self._first)

    @property
    def unsent(self) -> int:
        """Results waiting to be sent on the current stream."""
        return self.next_seq - max(self._sent, self._first)

    def add(self, result: ProbeResult) -> bool:
        """Append a result numbered ``next_seq``. Always True: the bound is applied when
        the results reach the disk, and the spool counts and logs its drops itself."""
        if result.seq != self.next_seq:
            raise ValueError(f"result numbered {result.seq}, expected {self.next_seq}")
        self.next_seq += 1
        self._mem_unsent.append(result)
        pending = self._pending
        pending.append(result)
        if len(pending) >= self._early_flush and not self._write_failed:
            self.flush()  # early: memory stays bounded whatever the rate
        self._grew.set()
        return True

    def take_unsent(self, limit: int) -> list[ProbeResult]:
        """Up to ``limit`` of the oldest unsent results, now counted as in flight; read
        from disk while they are older than what memory holds."""
        batch: list[ProbeResult] = []
        while len(batch) < limit and self.unsent:
            start = max(self._sent, self._first)
            memory_first = self._memory_first()
            if start < memory_first:
                stop = min(memory_first, start + limit - len(batch))
                batch.extend(self._read(start, stop))
                self._sent = stop
            else:
                unsent = self._mem_unsent
                taken = [unsent.popleft() for _ in range(min(limit - len(batch), len(unsent)))]
                self._mem_sent.extend(taken)
                self._sent = start + len(taken)
                batch.extend(taken)
        return batch

    def ack(self, seq: int) -> int:
        """Forget every result at or below ``seq``; returns how many were forgotten. An
        acknowledgement past ``next_seq`` (the coordinator saw results this spool lost
        in a crash) moves ``next_seq`` past it, so that no number is used twice."""
        if seq < self._first:
            return 0
        forgotten = min(seq + 1, self.next_seq) - self._first
        if seq >= self.next_seq:
            if seq >= self.next_seq + 1:
                self._log.info(
                    "coordinator has results past the spool's: numbering continues after them",
                    next_seq=self.next_seq,
                    coordinator_seq=seq,
                )
            self.next_seq = seq + 1
        self._forget_below(seq + 1)
        return forgotten

    def rewind(self) -> None:
        """A new stream: everything unacknowledged is unsent again, oldest first."""
        self._sent = self._first
        self._mem_sent.extend(self._mem_unsent)
        self._mem_unsent = self._mem_sent
        self._mem_sent = deque()
        if self.unsent:
            self._grew.set()

    async def wait_unsent(self, at_least: int, deadline: float) -> bool:
        """Wait until ``at_least`` results are unsent (True) or the loop clock reaches
        ``deadline`` (False, unless they arrived just in time)."""
        return await wait_grown(self._grew, lambda: self.unsent, at_least, deadline)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def disk_bytes(self) -> int:
        """Bytes in the log's segments."""
        return self._disk_bytes

    async def run(self) -> None:
        """Flush every ``flush_interval`` until cancelled; sync to stable storage on a
        worker thread when results stay unacknowledged across flushes."""
        while True:
            await asyncio.sleep(self.flush_interval)
            if self.flush():
                await self.sync()

    def flush(self) -> bool:
        """Write what was added since the last flush and is still unacknowledged, apply
        the bound, save the state, delete acknowledged segments. True when results
        written by an earlier flush are still unacknowledged: they should be synced."""
        if self._closed:
            return False
        written_before = self._flushed
        self._delete_acknowledged()  # so that a log all acknowledged starts a new segment
        self._write_pending()
        self._apply_bound()
        self._save_state()
        self._delete_acknowledged()
        self._evict()
        self._close_retired()
        self._log_drops()
        if self._first >= written_before:
            # Everything on disk from earlier flushes is acknowledged: no sync wanted,
            # and sealed segments are closed without one.
            self._retired_fds.extend(self._unsynced_fds)
            self._unsynced_fds.clear()
            self._close_retired()
            return False
        return self._synced < self._flushed or self._dir_dirty

    def close(self) -> None:
        """Flush and sync what is still wanted, release the lock. Idempotent."""
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self.flush()
        self._sync_done.wait(timeout=60)
        fds = list(self._unsynced_fds)
        if self._active is not None:
            fds.append(self._active)
        if self._first < self._flushed:
            self._sync_now(fds)
        self._closed = True
        self._retired_fds.extend(fds)
        self._unsynced_fds.clear()
        self._active = None
        self._drop_reader()
        self._close_retired()
        for fd in (self._dir_fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._dir_fd = self._lock_fd = -1
        if self._dropped_unlogged:
            self._drop_logged_at = -float("inf")
            self._log_drops()

    # -- opening ------------------------------------------------------------------------

    def _open(self) -> None:
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except FileExistsError:
            raise SpoolError(f"spool directory {directory} is not a directory") from None
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {directory}: {_why(exc)}") from None
        if not directory.is_dir():
            raise SpoolError(f"spool directory {directory} is not a directory")
        try:
            self._lock_fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool directory {directory} is not writable: {_why(exc)}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            self._lock_fd = -1
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise SpoolError(
                    f"spool directory {directory} is in use by another agent{who}"
                ) from None
            raise SpoolError(f"cannot lock spool directory {directory}: {_why(exc)}") from None
        try:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
            self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            self.id = self._read_or_make_id()
            self._recover()
            self._save_state()
        except OSError as exc:
            self._closed = True
            for fd in (self._dir_fd, self._lock_fd):
                if fd >= 0:
                    os.close(fd)
            raise SpoolError(f"spool directory {directory} is not usable: {_why(exc)}") from None
        self._log.info(
            "spool opened",
            instance_id=self.id,
            next_seq=self.next_seq,
            unacknowledged=len(self),
            disk_bytes=self._disk_bytes,
            dropped_total=self.dropped,
        )

    def _read_or_make_id(self) -> str:
        path = self.directory / _ID
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text(errors="replace").strip()
            if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
                return text
            self._log.warning(
                "spool id unreadable: starting a new instance (the coordinator may take "
                "results spooled under the old one for new)",
                found=text[:64],
            )
        made = uuid.uuid4().hex
        staged = path.with_name(_ID + ".tmp")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (made + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staged, path)
        os.fsync(self._dir_fd)
        return made

    def _recover(self) -> None:
        """Read state.json and the segments: what is wanted, where numbering goes on."""
        next_seq, first, dropped = self._read_state()
        segments: list[_Segment] = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            stem = name.removesuffix(_SEGMENT_SUFFIX)
            if name.endswith(_SEGMENT_SUFFIX) and stem.isdigit() and entry.is_file():
                path = Path(entry.path)
                segments.append(_Segment(path, int(stem), entry.stat().st_size))
        segments.sort(key=lambda segment: segment.first)
        lost = damaged = 0
        if segments:
            newest = segments[-1]
            torn = self._validate(newest)
            if newest.end is None:  # nothing valid in it
                self._unlink(newest.path)
                segments.pop()
            # Numbering continues after the highest number used. Results the state knows
            # of past the last valid record are lost (counted when the replay reaches
            # them, unless the coordinator has them); so are those of a torn record
            # written after the state was, counted now: their numbers are used again.
            end = segments[-1].end if segments else newest.first
            assert end is not None
            if next_seq > end:
                damaged = next_seq - end
            else:
                damaged = lost = torn
            next_seq = max(next_seq, end)
        first = min(max(first, 1), next_seq)
        kept = []
        for index, segment in enumerate(segments):
            end = segment.end if index == len(segments) - 1 else segments[index + 1].first
            assert end is not None
            if end <= first:
                self._unlink(segment.path)
            else:
                kept.append(segment)
        if kept and kept[0].first > first:
            lost += kept[0].first - first
            first = kept[0].first
        elif not kept and first < next_seq:
            lost += next_seq - first
            first = next_seq
        if lost or damaged:
            self._log.warning(
                "spool damaged: results lost (everything valid before them is kept)",
                lost=max(lost, damaged),
            )
        self._segments = kept
        self._disk_bytes = sum(segment.size for segment in kept)
        self.next_seq = next_seq
        self.dropped = dropped + lost
        self._first = self._sent = first
        self._flushed = self._synced = next_seq

    def _read_state(self) -> tuple[int, int, int]:
        path = self.directory / _STATE
        try:
            state = json.loads(path.read_text())
            values = (state["next_seq"], state["first"], state["dropped"])
            if all(isinstance(value, int) and value >= 0 for value in values):
                return max(values[0], 1), values[1], values[2]
            raise ValueError("negative or not a number")
        except FileNotFoundError:
            return 1, 1, 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._log.warning(
                "spool state unreadable: numbering continues from the segments, "
                "the dropped count restarts at 0",
                error=str(exc),
            )
            return 1, 1, 0

    def _validate(self, segment: _Segment) -> int:
        """Read ``segment`` record by record; cut it after the last valid record and set
        its ``end``. Returns the results lost in what was cut."""
        data = segment.path.read_bytes()
        offset = 0
        end: int | None = None
        lost = 0
        while offset < len(data):
            record = _parse(data, offset)
            if record is None:
                # Whatever follows a bad record cannot be trusted: a torn write.
                with contextlib.suppress(struct.error):
                    magic, _length, _crc, _first, count = _HEADER.unpack_from(data, offset)
                    if magic == _MAGIC and count <= CHUNK_RESULTS:
                        lost += count
                self._log.warning(
                    "spool segment ends in a torn or corrupt record: cut after the last valid one",
                    segment=segment.path.name,
                    bytes_cut=len(data) - offset,
                )
                with open(segment.path, "r+b") as file:
                    file.truncate(offset)
                break
            first, count, _payload, offset = record
            end = first + count
        segment.size = offset
        segment.end = end
        return lost

    # -- writing ------------------------------------------------------------------------

    def _write_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        skip = max(0, self._first - pending[0].seq)
        results = pending[skip:] if skip else pending
        try:
            self._append(results)
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                self._log.error(
                    "spool write failed: results stay in memory, retried at every flush",
                    error=_why(exc),
                )
            if len(pending) > self._early_flush:
                self._drop_below(pending[-self._early_flush].seq)
                self._pending = [result for result in pending if result.seq >= self._first]
            return
        if self._write_failed:
            self._write_failed = False
            self._log.info("spool writes again")
        self._pending = []
        self._flushed = self.next_seq

    def _append(self, results: list[ProbeResult]) -> None:
        chunk_results = self._chunk_results
        out: list[bytes] = []
        out_bytes = 0
        for start in range(0, len(results), chunk_results):
            chunk = results[start : start + chunk_results]
            record = _encode(chunk)
            if self._active is None or self._segments[-1].size + out_bytes >= self._segment_bytes:
                self._write(out)
                out, out_bytes = [], 0
                self._rotate(chunk[0].seq)
            out.append(record)
            out_bytes += len(record)
        self._write(out)

    def _write(self, records: list[bytes]) -> None:
        if not records:
            return
        assert self._active is not None
        segment = self._segments[-1]
        data = b"".join(records) if len(records) > 1 else records[0]
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._active, view[written:])
        except OSError:
            # Leave no partial record behind for the next write to follow.
            with contextlib.suppress(OSError):
                os.ftruncate(self._active, segment.size)
            self._seal()
            if not segment.size:  # its name may be needed again
                self._segments.pop()
                self._unlink(segment.path)
            raise
        _first, count = _RANGE.unpack_from(records[-1], 12)
        segment.end = _first + count
        segment.size += len(data)
        self._disk_bytes += len(data)

    def _rotate(self, first: int) -> None:
        """Seal the segment being written and start one whose first result is ``first``."""
        self._seal()
        path = self.directory / f"{first:020d}{_SEGMENT_SUFFIX}"
        self._active = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self._segments.append(_Segment(path, first, 0, first))
        self._dir_dirty = True

    def _seal(self) -> None:
        if self._active is not None:
            self._unsynced_fds.append(self._active)
            self._active = None

    def _apply_bound(self) -> None:
        """Drop (count) the wanted results of the oldest segments while the log is over
        ``max_bytes``; ``_delete_acknowledged`` deletes the segments once the state that
        says so is saved."""
        segments = self._segments
        excess = self._disk_bytes - self.max_bytes
        index = 0
        while excess > 0 and index < len(segments) - 1:
            excess -= segments[index].size
            index += 1
        if index:
            self._drop_below(segments[index].first)

    def _delete_acknowledged(self) -> None:
        """Delete the segments holding nothing wanted, once the state says so (a state
        behind the files would take them for lost)."""
        segments = self._segments
        first = self._first
        while segments and (
            segments[1].first <= first
            if len(segments) > 1
            else segments[0].end is not None and segments[0].end <= first
        ):
            self._save_state()
            self._delete_oldest()

    def _delete_oldest(self) -> None:
        segment = self._segments.pop(0)
        if self._reader is not None and self._reader[0] is segment:
            self._drop_reader()
        if not self._segments and self._active is not None:
            self._retired_fds.append(self._active)
            self._active = None
        self._disk_bytes -= segment.size
        self._unlink(segment.path)
        self._dir_dirty = True

    def _unlink(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._log.warning(
                "spool segment could not be deleted", segment=path.name, error=_why(exc)
            )

    def _save_state(self) -> None:
        state = (self.next_seq, self._first, self.dropped)
        if state == self._saved_state:
            return
        path = self.directory / _STATE
        staged = path.with_name(_STATE + ".tmp")
        text = json.dumps({"next_seq": state[0], "first": state[1], "dropped": state[2]})
        try:
            staged.write_text(text + "\n")
            os.replace(staged, path)
        except OSError as exc:
            self._log.error("spool state could not be saved", error=_why(exc))
            return
        self._saved_state = state

    # -- syncing ------------------------------------------------------------------------

    async def sync(self) -> None:
        """Bring what the flushes wrote to stable storage, on a worker thread (``run``
        does when ``flush`` says so)."""
        if not self._sync_done.is_set():
            return  # the previous one is still running: the next flush tries again
        sealed = list(self._unsynced_fds)
        fds = [*sealed, *([self._active] if self._active is not None else [])]
        if self._dir_dirty:
            fds.append(self._dir_fd)
            self._dir_dirty = False
        upto = self._flushed
        self._sync_done.clear()
        try:
            await asyncio.to_thread(self._sync_fds, fds)
        finally:
            if self._sync_done.is_set():
                self._after_sync(sealed, upto)

    def _sync_fds(self, fds: list[int]) -> None:
        """On the worker thread; the loop closes none of these fds meanwhile."""
        try:
            for fd in fds:
                _fdatasync(fd)
        except OSError as exc:
            self._sync_error = exc
        finally:
            self._sync_done.set()

    def _after_sync(self, sealed: list[int], upto: int) -> None:
        error, self._sync_error = self._sync_error, None
        if error is not None:
            self._log.error("spool sync failed", error=_why(error))
            self._dir_dirty = True
            return
        self._synced = max(self._synced, upto)
        for fd in sealed:
            self._unsynced_fds.remove(fd)
            self._retired_fds.append(fd)
        self._close_retired()

    def _sync_now(self, fds: list[int]) -> None:
        """On the calling thread (closing): the active and sealed segments, the directory."""
        try:
            for fd in fds:
                _fdatasync(fd)
            if self._dir_fd >= 0:
                os.fsync(self._dir_fd)
        except OSError as exc:
            self._log.error("spool sync failed", error=_why(exc))

    def _close_retired(self) -> None:
        if not self._sync_done.is_set():
            return
        for fd in self._retired_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._retired_fds.clear()

    # -- memory -------------------------------------------------------------------------

    def _memory_first(self) -> int:
        return self.next_seq - len(self._mem_sent) - len(self._mem_unsent)

    def _evict(self) -> None:
        """Forget from memory the oldest results beyond ``memory_results`` that are on
        disk (they are read back from there if they have to be sent again)."""
        excess = len(self._mem_sent) + len(self._mem_unsent) - self._memory_results
        if excess <= 0:
            return
        evictable = max(0, self._flushed - self._memory_first())
        for _ in range(min(excess, evictable)):
            (self._mem_sent or self._mem_unsent).popleft()

    def _forget_below(self, seq: int) -> None:
        """Nothing below ``seq`` is wanted any more (acknowledged or dropped)."""
        if seq <= self._first:
            return
        self._first = seq
        for queue in (self._mem_sent, self._mem_unsent):
            while queue and queue[0].seq < seq:
                queue.popleft()
        if self._sent < seq:
            self._sent = seq
        if self.next_seq < seq:  # acknowledged past next_seq: ack moved it already
            self.next_seq = seq
        if self._flushed < seq:
            self._flushed = seq  # _write_pending skips what is no longer wanted

    def _drop_below(self, seq: int) -> None:
        """Drop (and count) the wanted results below ``seq``."""
        count = seq - self._first
        if count <= 0:
            return
        self.dropped += count
        self._dropped_unlogged += count
        self._forget_below(seq)

    def _log_drops(self) -> None:
        if not self._dropped_unlogged:
            return
        now = self._clock()
        if now - self._drop_logged_at < DROP_LOG_PERIOD:
            return
        self._log.warning(
            "spool full: dropped the oldest results",
            dropped=self._dropped_unlogged,
            dropped_total=self.dropped,
            spool_bytes=self.max_bytes,
        )
        self._dropped_unlogged = 0
        self._drop_logged_at = now

    # -- reading back -------------------------------------------------------------------

    def _read(self, start: int, stop: int) -> list[ProbeResult]:
        """The wanted results ``[start, stop)`` from disk, in order. Numbers no valid
        record holds are lost: logged, counted in ``dropped``, skipped."""
        results: list[ProbeResult] = []
        seq = start
        while seq < stop:
            found = self._record_at(seq)
            first = found[0] if found is not None else stop
            if first > seq:
                self._lose(seq, min(first, stop))
                seq = first
                continue
            assert found is not None
            items = found[1]
            taken = items[seq - first : stop - first]
            results.extend(taken)
            seq = first + len(items)
        return results

    def _lose(self, start: int, stop: int) -> None:
        """Results ``[start, stop)`` are in no readable record; counted once, however
        often a rewind reads past them again."""
        count = stop - max(start, self._lost_upto)
        if count <= 0:
            return
        self._lost_upto = stop
        self.dropped += count
        self._log.warning("spool records unreadable: results lost", lost=count, first_seq=start)

    def _record_at(self, seq: int) -> tuple[int, list[ProbeResult]] | None:
        """The decoded record holding ``seq``, or else the first one after it, or None."""
        cached = self._chunk
        if cached is not None and cached[0] <= seq < cached[0] + len(cached[1]):
            return cached
        segments = self._segments
        index = max(0, bisect_right([s.first for s in segments], seq) - 1)
        while index < len(segments):
            segment = segments[index]
            record = self._scan(segment, seq)
            if record is not None:
                self._chunk = record
                return record
            index += 1
        return None

    def _scan(self, segment: _Segment, seq: int) -> tuple[int, list[ProbeResult]] | None:
        """In ``segment``, the record holding ``seq`` or the first after it (None: not
        there). A bad record ends the segment: what follows it counts as lost."""
        if self._reader is None or self._reader[0] is not segment:
            self._drop_reader()
            try:
                fd = os.open(segment.path, os.O_RDONLY)
            except OSError as exc:
                self._log.warning(
                    "spool segment unreadable", segment=segment.path.name, error=_why(exc)
                )
                return None
            self._reader = (segment, fd)
            self._read_offset = 0
            self._read_next = 0
        fd = self._reader[1]
        if seq < self._read_next:  # behind the last record read: from the start
            self._read_offset = 0
            self._read_next = 0
        size = segment.size if segment.readable is None else segment.readable
        offset = self._read_offset
        while offset + _HEADER.size <= size:
            header = os.pread(fd, _HEADER.size, offset)
            if len(header) < _HEADER.size:
                break
            magic, length, _crc, first, count = _HEADER.unpack(header)
            if magic != _MAGIC or length > _MAX_PAYLOAD or offset + _HEADER.size + length > size:
                break
            following = offset + _HEADER.size + length
            if first + count <= seq:  # wholly before: skip without reading its payload
                offset = following
                self._read_offset, self._read_next = offset, first + count
                continue
            data = os.pread(fd, _HEADER.size + length, offset)
            parsed = _parse(data, 0)
            if parsed is None:
                break
            _first, _count, payload, _ = parsed
            try:
                batch = agent_pb2.ResultBatch.FromString(payload)
                items = [result_from_pb(message) for message in batch.results]
            except (WireError, ValueError):
                break
            if len(items) != count or (items and items[0].seq != first):
                break
            self._read_offset, self._read_next = following, first + count
            return first, items
        if offset < size:
            self._log.warning(
                "spool record unreadable: skipping the rest of its segment",
                segment=segment.path.name,
                offset=offset,
            )
            segment.readable = offset
        return None

    def _drop_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(OSError):
                os.close(self._reader[1])
            self._reader = None
        self._chunk = None


def _encode(results: list[ProbeResult]) -> bytes:
    batch = agent_pb2.ResultBatch()
    results_to_pb(results, batch)
    payload = batch.SerializeToString()
    span = _RANGE.pack(results[0].seq, len(results))
    crc = zlib.crc32(payload, zlib.crc32(span))
    return _HEADER.pack(_MAGIC, len(payload), crc, results[0].seq, len(results)) + payload


def _parse(data: bytes, offset: int) -> tuple[int, int, bytes, int] | None:
    """(first seq, count, payload, offset after it) of the record at ``offset``, or None
    when it is torn or corrupt."""
    if offset + _HEADER.size > len(data):
        return None
    magic, length, crc, first, count = _HEADER.unpack_from(data, offset)
    start = offset + _HEADER.size
    if magic != _MAGIC or length > _MAX_PAYLOAD or start + length > len(data) or count < 1:
        return None
    payload = data[start : start + length]
    if zlib.crc32(payload, zlib.crc32(data[offset + 12 : start])) != crc:
        return None
    return first, count, payload, start + length


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
