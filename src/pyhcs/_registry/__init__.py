"""The registry: one embedded SQLite database for everything pyhcs knows.

It holds layers, images, containers and processes (and, with the network service,
networks, endpoints and IP allocations). WAL mode lets readers run beside one writer,
and a busy timeout makes concurrent clients wait instead of failing. Every write is one
short transaction; nothing holds a transaction open across a slow operation.

A connection belongs to one process: after ``fork`` the child opens its own
(:meth:`Registry.open` checks the pid).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["Registry"]

_SCHEMA_VERSION = 2  # 2: the network service's tables

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    id          TEXT PRIMARY KEY,
    parent      TEXT,
    kind        TEXT NOT NULL,           -- 'base' | 'layer' | 'sandbox'
    path        TEXT NOT NULL,           -- absolute folder of the layer
    flavour     INTEGER NOT NULL,        -- DriverInfo.flavour when created
    state       TEXT NOT NULL,           -- 'importing' | 'ready'
    digest      TEXT,                    -- sha256 of the imported archive, if any
    size        INTEGER NOT NULL DEFAULT 0,
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    name        TEXT PRIMARY KEY,
    top_layer   TEXT NOT NULL,           -- the topmost layer (the chain follows parents)
    config      TEXT NOT NULL DEFAULT '{}', -- image config (Env, Cmd, ...) as JSON
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    owner       TEXT NOT NULL DEFAULT '',
    system_type TEXT NOT NULL DEFAULT 'Container',
    config      TEXT NOT NULL,           -- the ContainerConfig document (hcsshim JSON)
    state       TEXT NOT NULL,           -- 'created' | 'running' | 'paused' | 'stopped'
    exit_code   INTEGER,
    exit_type   TEXT NOT NULL DEFAULT '',
    supervisor_pid   INTEGER,
    supervisor_start INTEGER,           -- start time (clock ticks) guarding against pid reuse
    image       TEXT NOT NULL DEFAULT '',
    auto_remove INTEGER NOT NULL DEFAULT 0,
    sandbox_layer TEXT NOT NULL DEFAULT '', -- the sandbox pyhcs made ('' if the caller's)
    layer_home  TEXT NOT NULL DEFAULT '',   -- DriverInfo.home_dir of that sandbox
    created     REAL NOT NULL,
    started     REAL,
    finished    REAL
);
CREATE TABLE IF NOT EXISTS processes (
    container_id TEXT NOT NULL REFERENCES containers(id) ON DELETE CASCADE,
    pid          INTEGER NOT NULL,       -- pid on the host
    inner_pid    INTEGER NOT NULL,       -- pid inside the container
    config       TEXT NOT NULL,
    exit_code    INTEGER,
    created      REAL NOT NULL,
    finished     REAL,
    PRIMARY KEY (container_id, pid)
);
-- The network service (pyhcs._network). Documents are hcsshim JSON; the columns beside
-- them are what the service looks up or must keep unique.
CREATE TABLE IF NOT EXISTS networks (
    id          TEXT PRIMARY KEY,        -- upper-case GUID, as HNS writes it
    name        TEXT NOT NULL UNIQUE,
    type        TEXT NOT NULL,           -- 'nat' | 'l2bridge' | 'transparent' | 'overlay'
    doc         TEXT NOT NULL,           -- the HNSNetwork document
    state       TEXT NOT NULL,           -- 'creating' | 'ready' | 'deleting'
    owner_pid   INTEGER,                 -- who is creating/deleting it (recovery checks)
    owner_start INTEGER,                 -- its start time (clock ticks) against pid reuse
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS net_subnets (
    network_id  TEXT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    prefix      TEXT NOT NULL,           -- canonical CIDR, checked for overlap on create
    PRIMARY KEY (network_id, prefix)
);
CREATE TABLE IF NOT EXISTS endpoints (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    network_id  TEXT NOT NULL REFERENCES networks(id),
    doc         TEXT NOT NULL,           -- the HNSEndpoint document
    state       TEXT NOT NULL,           -- 'creating' | 'ready' | 'deleting'
    container_id TEXT NOT NULL DEFAULT '', -- the container it is attached to ('' if none)
    netns_path  TEXT NOT NULL DEFAULT '',
    netns_ino   INTEGER NOT NULL DEFAULT 0, -- the compartment id (netns inode)
    ifname      TEXT NOT NULL DEFAULT '', -- its interface's name inside the netns
    attach_state TEXT NOT NULL DEFAULT '', -- '' | 'attaching' | 'attached' | 'detaching'
    owner_pid   INTEGER,                 -- who is creating/attaching/deleting it
    owner_start INTEGER,
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ip_allocations (
    network_id  TEXT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    address     TEXT NOT NULL,
    endpoint_id TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    PRIMARY KEY (network_id, address)
);
CREATE TABLE IF NOT EXISTS mac_allocations (
    network_id  TEXT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    mac         TEXT NOT NULL,           -- upper-case, dash-separated, as HNS writes it
    endpoint_id TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    PRIMARY KEY (network_id, mac)
);
CREATE TABLE IF NOT EXISTS port_mappings (
    protocol    TEXT NOT NULL,           -- 'tcp' | 'udp'
    external_port INTEGER NOT NULL,      -- a host port belongs to one mapping at a time
    endpoint_id TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    internal_port INTEGER NOT NULL,
    PRIMARY KEY (protocol, external_port)
);
CREATE TABLE IF NOT EXISTS policy_lists (
    id          TEXT PRIMARY KEY,
    doc         TEXT NOT NULL,           -- the policy list document (HNS JSON)
    created     REAL NOT NULL
);
"""


class Registry:
    """A connection to the registry at *db_path*; create it with :meth:`open`."""

    _cache: ClassVar[dict[tuple[int, str], Registry]] = {}
    _cache_lock = threading.Lock()

    def __init__(self, db_path: Path) -> None:
        self.path = db_path
        self._pid = os.getpid()
        db_path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the
        # write lock up front and waits on busy_timeout instead of failing on upgrade.
        self._conn = sqlite3.connect(
            db_path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        c = self._conn
        c.execute("PRAGMA busy_timeout = 30000")
        c.execute("PRAGMA journal_mode = WAL")
        # NORMAL is durable across process crashes in WAL mode; only power loss can lose the
        # last commits, which recovery handles like a crash.
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute("PRAGMA foreign_keys = ON")
        (version,) = c.execute("PRAGMA user_version").fetchone()
        if version < _SCHEMA_VERSION:
            with self.transaction():
                # comments go first: a ';' in one must not split a statement
                body = "\n".join(line.split("--", 1)[0] for line in _SCHEMA.splitlines())
                for stmt in body.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    #: connections kept open for reuse; a program going through many state roots (a test
    #: suite, a tool per project) must not keep three descriptors open for each of them
    _KEEP: ClassVar[int] = 8

    @classmethod
    def open(cls, db_path: Path) -> Registry:
        """The registry at *db_path*: one shared connection per process and path among the
        few most recently used; an older one closes once nobody holds it any more."""
        key = (os.getpid(), str(db_path))
        with cls._cache_lock:
            reg = cls._cache.pop(key, None)
            if reg is None:
                reg = cls(db_path)
            cls._cache[key] = reg  # most recently used last
            while len(cls._cache) > cls._KEEP:
                # dropped, not closed: a caller may be using it still; the connection
                # closes with its last reference
                del cls._cache[next(iter(cls._cache))]
            return reg

    def __del__(self) -> None:
        # sqlite3's connection sits in a reference cycle (its statement cache) and would
        # hold its three descriptors until a garbage collection; a registry dropped from
        # the cache closes it as soon as its last user is done. Never in a forked child:
        # the connection is the parent's.
        if getattr(self, "_pid", None) == os.getpid():
            with contextlib.suppress(Exception):
                self._conn.close()

    def close(self) -> None:
        with self._cache_lock:
            for k, v in list(self._cache.items()):
                if v is self:
                    del self._cache[k]
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a read query and return all rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
    ) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
            return row

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> int:
        """Run one write statement in its own transaction; return the changed row count."""
        with self.transaction() as c:
            return c.execute(sql, params).rowcount

    # -- helpers shared by the services -----------------------------------------------------

    @staticmethod
    def now() -> float:
        return time.time()

    @staticmethod
    def dumps(obj: Any) -> str:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True)
