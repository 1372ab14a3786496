"""One writer at a time: a lease object in the store, and the marker of a creation in progress.

Zarr v3 has no locks, and two processes writing one store's metadata lose each other's changes. A
writer (extract, extend, save_features) therefore takes a *lease* first: a small JSON object
`_lease.json` at the store's root, created exclusively, naming its holder (user, host, pid, start
time) and refreshed by a heartbeat thread. A second writer is refused with a message naming the
holder. A lease is taken over without asking only when it is provably dead (same host, its process
gone); a lease whose heartbeat is older than `STALE_AFTER_S` may be broken with `break_stale=True`
(`diffbank extract --break-lease`), which says so.

The lease is created exclusively where the filesystem allows it (`extract.store.root_objects`).

`_creating.json` exists from before the first object of a new store is written until its root
attributes are: a store holding it was interrupted while being created and holds no data yet, so it
is recognisably empty and is recreated.

The lease is transient: it is deleted when the writer finishes, so a finished store holds exactly the
objects Zarr wrote.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from extract.store.layout import StoreError
from extract.store.root_objects import RootObjects

log = logging.getLogger(__name__)

LEASE_KEY = "_lease.json"
CREATING_KEY = "_creating.json"
OWN_KEYS = frozenset({LEASE_KEY, CREATING_KEY})
STALE_AFTER_S = 10 * 60.0  # a heartbeat this old means the holder is most likely gone
HEARTBEAT_S = 30.0


class LeaseHeld(StoreError):
    """Another writer holds the store's lease."""


class LeaseLost(StoreError):
    """This writer's lease was broken by another writer: it must stop writing."""


# ---------------------------------------------------------------------------------------------
# The lease
# ---------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so a reused pid is not taken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def describe_holder(record: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    beat = float(record.get("heartbeat_epoch", 0))
    return (
        f"{record.get('owner', '?')}@{record.get('host', '?')} pid {record.get('pid', '?')} "
        f"(started {record.get('started', '?')}, last heartbeat {_age(max(0.0, now - beat))} ago)"
    )


_HELD: dict[str, Lease] = {}  # url -> this process's lease on it (leases are reentrant per process)
_HELD_LOCK = threading.Lock()


class Lease:
    """This process's writer lease on one store; `release()` once per `acquire()`."""

    def __init__(self, objects: RootObjects, record: dict[str, Any], heartbeat_s: float):
        self.objects = objects
        self.url = objects.url
        self.record = record
        self.token = record["token"]
        self.lost: str | None = None
        self._count = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="diffbank-lease", daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                current = _parse(self.objects.read(LEASE_KEY))
                if current is None or current.get("token") != self.token:
                    self.lost = describe_holder(current) if current else "nobody (the lease was deleted)"
                    return
                now = time.time()
                self.record.update({"heartbeat": _iso(now), "heartbeat_epoch": now})
                self.objects.replace(LEASE_KEY, _dump(self.record))
            except Exception as exc:  # a failed beat is retried; a lost lease is caught by check()
                log.debug(f"lease heartbeat on {self.url} failed: {exc}")

    def check(self) -> None:
        """Raise LeaseLost if another writer has taken this store over."""
        if self.lost is None:
            current = _parse(self.objects.read(LEASE_KEY))
            if current is None or current.get("token") != self.token:
                self.lost = describe_holder(current) if current else "nobody (the lease was deleted)"
        if self.lost is not None:
            raise LeaseLost(
                f"{self.url}: this run's writer lease was taken over by {self.lost}; stopping so that "
                f"two writers never mix in one store"
            )

    def release(self) -> None:
        with _HELD_LOCK:
            self._count -= 1
            if self._count > 0:
                return
            _HELD.pop(self.url, None)
        self._stop.set()
        try:
            current = _parse(self.objects.read(LEASE_KEY))
            if current is not None and current.get("token") == self.token:
                self.objects.delete(LEASE_KEY)
            if self.objects.created_root and not self.objects.names():
                self.objects.root.rmdir()  # a run refused before writing leaves no empty folder behind
        except OSError as exc:  # a read-only or vanished store: nothing to clean up
            log.debug(f"could not remove the lease of {self.url}: {exc}")

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _dump(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _parse(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return {"token": None, "corrupt": True}  # half-written by a killed writer: judged stale below
    return doc if isinstance(doc, dict) else {"token": None, "corrupt": True}


def _new_record() -> dict[str, Any]:
    now = time.time()
    try:
        owner = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        owner = str(os.getuid()) if hasattr(os, "getuid") else "?"
    pid = os.getpid()
    return {
        "token": uuid.uuid4().hex,
        "owner": owner,
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start(pid),
        "started": _iso(now),
        "heartbeat": _iso(now),
        "heartbeat_epoch": now,
    }


def _writable_error(url: str, exc: OSError) -> StoreError:
    return StoreError(
        f"cannot write to {url} ({exc.strerror or exc}): the store is read-only here. It can be read "
        f"(diffbank store info / probe), not resumed or extended; copy it somewhere writable to do that"
    )


def acquire(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    break_stale: bool = False,
    stale_after_s: float = STALE_AFTER_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> Lease:
    """Take the writer lease of the store at `url`, or raise LeaseHeld naming its holder.

    Reentrant within a process. A lease of a dead process on this host is taken over with a warning;
    a stale one (heartbeat older than `stale_after_s`) only with `break_stale`.
    """
    with _HELD_LOCK:
        mine = _HELD.get(url)
        if mine is not None:
            mine._count += 1
            return mine
    objects = RootObjects(url, storage_options)
    record = _new_record()
    data = _dump(record)
    for _ in range(3):
        try:
            if objects.create(LEASE_KEY, data):
                lease = Lease(objects, record, heartbeat_s)
                with _HELD_LOCK:
                    _HELD[url] = lease
                return lease
            current = _parse(objects.read(LEASE_KEY))
        except PermissionError as exc:
            raise _writable_error(url, exc) from None
        except OSError as exc:
            if exc.errno in (30, 13):  # EROFS, EACCES
                raise _writable_error(url, exc) from None
            raise
        if current is None:
            continue  # released in between: try again
        holder = describe_holder(current)
        age = time.time() - float(current.get("heartbeat_epoch", 0))
        dead = current.get("corrupt") or (
            current.get("host") == record["host"]
            and isinstance(current.get("pid"), int)
            and not _alive(current["pid"], current.get("pid_start"))
        )
        if dead:
            log.warning(f"{url}: taking over the lease of a writer that is gone: {holder}")
        elif age > stale_after_s and break_stale:
            log.warning(f"{url}: breaking the stale writer lease of {holder} (--break-lease)")
        elif age > stale_after_s:
            raise LeaseHeld(
                f"{url} is leased to another writer, {holder}, whose heartbeat is stale (older than "
                f"{_age(stale_after_s)}). If that run is gone, rerun with --break-lease to take the store over"
            )
        else:
            raise LeaseHeld(
                f"{url} is being written by another writer, {holder}; two writers would corrupt it. "
                f"Wait for that run to finish (its lease is released at the end)"
                + ("; --break-lease only takes over a lease whose heartbeat is stale" if break_stale else "")
            )
        if not _take_over(objects, current):
            continue
    raise LeaseHeld(f"{url}: another writer took the lease at the same moment; try again")


def _take_over(objects: RootObjects, seen: dict[str, Any]) -> bool:
    """Remove the lease `seen` if it is still the one there; False when it changed meanwhile."""
    if objects.local:
        aside = f"{LEASE_KEY}.{uuid.uuid4().hex}.broken"
        try:
            os.rename(objects._path(LEASE_KEY), objects._path(aside))  # atomic: one breaker wins
        except FileNotFoundError:
            return False
        moved = _parse(objects.read(aside))
        if moved is not None and moved.get("token") != seen.get("token"):
            try:  # a fresh lease taken meanwhile: put it back (link fails if yet another one exists)
                os.link(objects._path(aside), objects._path(LEASE_KEY))
            except OSError:
                pass
            objects.delete(aside)
            return False
        objects.delete(aside)
        return True
    current = _parse(objects.read(LEASE_KEY))
    if current is None or current.get("token") != seen.get("token"):
        return False
    objects.delete(LEASE_KEY)
    return True


def holder_of(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The lease record at `url`, if any (for `store info` and messages)."""
    return _parse(RootObjects(url, storage_options).read(LEASE_KEY))
