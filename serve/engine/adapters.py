"""The adapter registry: which LoRA adapters the server knows, which are resident on the model, which are in use.

    registry = AdapterRegistry(loaded, AdapterLimits(max_resident=8, max_rank=64), base_encoder=encoder)
    registry.register("charts", "/opt/ml/model/adapters/charts", preload=True, pin=False)
    lease = registry.checkout(["charts"], expires_at=deadline)   # resident now; not evicted until released
    ...                                                          # rows name it: GenerationRequest(adapter="charts")
    lease.release()
    registry.resolve("charts")                                   # "charts", or ApiError adapter_not_found
    registry.unregister("charts")                                # new requests 404; unloaded once idle

An adapter is *registered* (validated, its files on local disk) and, while it is *resident*, its weights are on the
model (serve/engine/lora.py). At most `max_resident` adapters and `memory_bytes` of their weights are resident; to
load another, the least recently used adapters that are neither pinned nor leased are evicted. An evicted adapter
stays registered and is loaded again by the next request that names it, so eviction never makes a name unknown.
`preload=False` registers without loading. Loading reads and checks the files (serve/engine/adapter_files.py) and
injects under the tree's lock, which adapter generation holds per batch: a load waits for the running batch, never
changes it; base-only batches never take that lock.

Leases count a request's use of its adapter from arrival to answer: unregistering waits for them (requests already
accepted on that adapter get its answers; new ones get 404), and eviction skips leased adapters. A lease ends when
released or at its expiry (the request's deadline), so a lost release cannot pin an adapter for good.
An adapter whose saved processor differs from the base's (chat template, image processing) has its own Encoder, so
its prompts are rendered as it was trained; one whose tokenizer differs is refused.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.engine.adapter_files import (
    AdapterFiles,
    SourcePolicy,
    base_facts,
    check_name,
    fetch_source,
    read_adapter,
)
from serve.engine.errors import ApiError

log = logging.getLogger(__name__)

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "chat_template.jinja")
DRAIN_POLL_S = 0.02


@dataclass(frozen=True)
class AdapterLimits:
    """How many adapters may be resident at once, how big, and where they may come from."""
    max_resident: int = 8
    max_rank: int = 64
    memory_bytes: int = 4 * 2**30  # weights of all resident adapters together
    sources: SourcePolicy = SourcePolicy()


@dataclass(eq=False)
class _Entry:
    name: str
    key: str  # the tree's name for it: PEFT keeps adapters in ModuleDicts, whose keys cannot hold dots
    src: str
    folder: Path
    owned: Path | None  # downloaded or unpacked files, removed with the adapter
    pinned: bool
    rank: int
    nbytes: int  # measured once resident; estimated from the files before
    encoder: Any
    resident: bool = False
    retiring: bool = False
    last_used: float = field(default_factory=time.monotonic)
    leases: dict[int, float] = field(default_factory=dict)  # lease id -> when it expires (time.monotonic)

    def busy(self, now: float) -> bool:
        return any(expiry > now for expiry in self.leases.values())


class Lease:
    """Some adapters in use by one request (or one batch); `release()` once done (idempotent)."""

    def __init__(self, registry: AdapterRegistry | None, entries: list[_Entry], lease_id: int):
        self._registry, self._entries, self._id = registry, entries, lease_id

    def release(self) -> None:
        if self._registry is not None:
            self._registry._release(self._entries, self._id)
            self._registry = None


NO_LEASE = Lease(None, [], 0)


class AdapterRegistry:
    def __init__(self, loaded: Any, limits: AdapterLimits, *, base_encoder: Any):
        from serve.engine.lora import LoraTree

        self.loaded = loaded
        self.limits = limits
        self.base_encoder = base_encoder
        self.tree = LoraTree(loaded.model)
        self.facts = base_facts(loaded.model.config)
        self._entries: dict[str, _Entry] = {}
        self._pending: set[str] = set()  # names being registered
        self._lock = threading.Lock()  # the bookkeeping above; never held while files load or the model runs
        self._residency = threading.Lock()  # one load or unload of weights at a time
        self._keys = itertools.count(1)
        self._lease_ids = itertools.count(1)

    # ------------------------------------------------------------------ names
    def resolve(self, name: str) -> str:
        """`name` if requests may use it (registered, not being unregistered); else ApiError adapter_not_found."""
        self._entry(name)
        return name

    def encoder(self, name: str) -> Any:
        """The Encoder that renders prompts for requests on `name` (also while it is being unregistered)."""
        return self._entry(name, retiring_ok=True).encoder

    def key(self, name: str) -> str:
        """The tree's key of a resident adapter the caller holds a lease on (even one being unregistered)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or not entry.resident:
                raise ApiError("adapter_not_found", f"adapter {str(name)[:80]!r} is not loaded on this server")
            return entry.key

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            now = time.monotonic()
            return [self._describe(e, now) for e in sorted(self._entries.values(), key=lambda e: e.name)]

    def _entry(self, name: str, *, retiring_ok: bool = False) -> _Entry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None or (entry.retiring and not retiring_ok):
            raise ApiError("adapter_not_found", f"adapter {str(name)[:80]!r} is not loaded on this server")
        return entry

    # ------------------------------------------------------------------ register / unregister
    def register(self, name: str, src: str, *, preload: bool = True, pin: bool = False) -> dict[str, Any]:
        """Fetch, check and (with `preload` or `pin`) load an adapter; ApiError for anything refused, and then
        nothing changed. Blocking: call it off the event loop."""
        check_name(name)
        with self._lock:
            if name in self._entries or name in self._pending:
                raise ApiError("adapter_exists", f"adapter {name!r} is already loaded; unload it first to replace it")
            self._pending.add(name)
        owned = None
        try:
            folder, owned = fetch_source(src, self.limits.sources, name)
            files = read_adapter(folder, self.facts, max_rank=self.limits.max_rank)
            entry = _Entry(name=name, key=f"a{next(self._keys)}", src=src, folder=folder, owned=owned, pinned=pin,
                           rank=files.rank, nbytes=self._estimate(files), encoder=self._encoder_for(folder))
            self._check_size(entry)
            if preload or pin:
                with self._residency:
                    self._load(entry, files, required=pin)
        except BaseException:
            with self._lock:
                self._pending.discard(name)
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        with self._lock:
            self._pending.discard(name)
            self._entries[name] = entry
        log.info("adapter %s registered from %s (rank %d, %s)", name, src, entry.rank,
                 "resident" if entry.resident else "loads on first use")
        return self._describe(entry, time.monotonic())

    def retire(self, name: str) -> None:
        """Refuse new requests on `name` (404) while the ones it is answering finish (again: a retried unload)."""
        entry = self._entry(name, retiring_ok=True)
        with self._lock:
            entry.retiring = True

    def busy(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.busy(time.monotonic())

    def remove(self, name: str) -> None:
        """Unload and forget `name` now (after `retire` and its requests: see `unregister`)."""
        with self._residency:
            with self._lock:
                entry = self._entries.pop(name, None)
            if entry is None:
                raise ApiError("adapter_not_found", f"adapter {name!r} is not loaded on this server")
            if entry.resident:
                self.tree.remove(entry.key)
        if entry.owned is not None:
            shutil.rmtree(entry.owned, ignore_errors=True)
        log.info("adapter %s unloaded", name)

    def unregister(self, name: str, *, timeout_s: float = 60.0) -> None:
        """retire, wait until no request uses it (at most `timeout_s`: then 503, still retiring), remove."""
        self.retire(name)
        deadline = time.monotonic() + timeout_s
        while self.busy(name):
            if time.monotonic() > deadline:
                raise still_busy(name)
            time.sleep(DRAIN_POLL_S)
        self.remove(name)

    def register_folder(self, root: Path) -> list[str]:
        """Every subfolder of `root` as an adapter named after it (start-up: `$SM_MODEL_DIR/adapters/<name>/`)."""
        names = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            try:
                self.register(folder.name, str(folder.resolve()), preload=True)
            except ApiError as e:
                raise ApiError(e.code, f"adapter folder {folder}: {e.message}") from None
            names.append(folder.name)
        return names

    # ------------------------------------------------------------------ use
    def checkout(self, names: Iterable[str], *, expires_at: float | None = None, retiring_ok: bool = False) -> Lease:
        """Lease `names` until released (or `expires_at`), loading any that is not resident. Blocking. A request
        arriving is refused an adapter being unregistered; `retiring_ok` is for the rows of requests accepted
        before (the predictor's own lease for its batch)."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return NO_LEASE
        lease_id, expiry = next(self._lease_ids), math.inf if expires_at is None else expires_at
        with self._lock:
            entries = [self._entries.get(name) for name in wanted]
            missing = [n for n, e in zip(wanted, entries, strict=True)
                       if e is None or (e.retiring and not retiring_ok)]
            if missing:
                raise ApiError("adapter_not_found", f"adapter {missing[0][:80]!r} is not loaded on this server")
            now = time.monotonic()
            for entry in entries:
                entry.leases[lease_id] = expiry
                entry.last_used = now
        lease = Lease(self, entries, lease_id)
        try:
            for entry in entries:
                if not entry.resident:
                    self._make_resident(entry)
        except BaseException:
            lease.release()
            raise
        return lease

    def _release(self, entries: list[_Entry], lease_id: int) -> None:
        with self._lock:
            for entry in entries:
                entry.leases.pop(lease_id, None)

    def generate(self, batch: dict[str, Any], names: list[str | None], **kwargs: Any) -> Any:
        """One generate call whose row i uses adapter `names[i]` (None: the base); the caller holds leases."""
        keys = [None if n is None else self.key(n) for n in names]
        return self.tree.generate(batch, keys, **kwargs)

    # ------------------------------------------------------------------ residency
    def _make_resident(self, entry: _Entry) -> None:
        with self._residency:
            if entry.resident:
                return
            files = read_adapter(entry.folder, self.facts, max_rank=self.limits.max_rank)
            if not self._load(entry, files, required=False):
                raise ApiError("overloaded", f"adapter {entry.name!r} cannot be loaded now: the "
                                             f"{self.limits.max_resident} resident adapters are pinned or answering "
                                             "requests; retry shortly")

    def _load(self, entry: _Entry, files: AdapterFiles, *, required: bool) -> bool:
        """Evict what must go and inject `entry` (the caller holds `_residency`). False when there is no room and
        it is not `required` (pinned); ApiError adapter_limit when it is."""
        if not self._make_room(entry):
            if required:
                raise ApiError("adapter_limit", f"no room to pin adapter {entry.name!r}: at most "
                                                f"{self.limits.max_resident} adapters and "
                                                f"{self.limits.memory_bytes / 2**20:.0f} MiB of adapter weights are "
                                                "resident, and the others are pinned or in use")
            return False
        size = self.tree.add(entry.key, files)
        with self._lock:
            entry.nbytes, entry.resident, entry.last_used = size, True, time.monotonic()
        return True

    def _make_room(self, entry: _Entry) -> bool:
        while True:
            with self._lock:
                resident = [e for e in self._entries.values() if e.resident and e is not entry]
                used = sum(e.nbytes for e in resident)
                if len(resident) < self.limits.max_resident and used + entry.nbytes <= self.limits.memory_bytes:
                    return True
                now = time.monotonic()
                idle = sorted((e for e in resident if not e.pinned and not e.busy(now)), key=lambda e: e.last_used)
                if not idle:
                    return False
                victim = idle[0]
                victim.resident = False  # a request for it from now on loads it again (after this eviction)
            self.tree.remove(victim.key)
            log.info("adapter %s evicted (least recently used) to make room for %s", victim.name, entry.name)

    def _check_size(self, entry: _Entry) -> None:
        if entry.nbytes > self.limits.memory_bytes:
            raise ApiError("adapter_too_large", f"adapter {entry.name!r} needs {entry.nbytes / 2**20:.1f} MiB; "
                                                f"the adapter memory budget is "
                                                f"{self.limits.memory_bytes / 2**20:.0f} MiB (SERVE_ADAPTER_MEMORY_MB)")
        if entry.pinned:
            with self._lock:
                pinned = [e for e in self._entries.values() if e.pinned]
            if len(pinned) >= self.limits.max_resident or \
                    sum(e.nbytes for e in pinned) + entry.nbytes > self.limits.memory_bytes:
                raise ApiError("adapter_limit", f"no room to pin adapter {entry.name!r}: {len(pinned)} pinned "
                                                "adapters fill the resident limits; unload one or do not pin")

    def _estimate(self, files: AdapterFiles) -> int:
        itemsize = self.tree.dtype.itemsize
        return sum(t.numel() for t in [*files.lora.values(), *files.projector.values()]) * itemsize

    def _encoder_for(self, folder: Path) -> Any:
        """The base's Encoder, unless the adapter saved a processor that renders or preprocesses differently."""
        from serve.engine.encoding import Encoder
        from serve.engine.model import ModelLoadError, _load_processor

        if not any((folder / f).is_file() for f in PROCESSOR_FILES):
            return self.base_encoder
        try:
            processor = _load_processor(folder)
        except ModelLoadError as e:
            raise ApiError("invalid_adapter", f"the adapter's processor files cannot be loaded: {e}") from None
        base = self.base_encoder.processor
        if processor.tokenizer.get_vocab() != base.tokenizer.get_vocab():
            raise ApiError("adapter_mismatch", "the adapter's tokenizer differs from the served model's")
        if processor.chat_template == base.chat_template and \
                processor.image_processor.to_dict() == base.image_processor.to_dict():
            return self.base_encoder
        log.info("adapter in %s has its own chat template or image processing: its prompts are encoded with them",
                 folder)
        return Encoder(processor)

    def _describe(self, entry: _Entry, now: float) -> dict[str, Any]:
        return {"name": entry.name, "src": entry.src, "rank": entry.rank, "resident": entry.resident,
                "pinned": entry.pinned, "bytes": entry.nbytes,
                "in_flight": sum(1 for expiry in entry.leases.values() if expiry > now),
                "own_processor": entry.encoder is not self.base_encoder}


def still_busy(name: str) -> ApiError:
    return ApiError("overloaded", f"adapter {name!r} is still answering requests; new ones are refused, retry the "
                                  "unload shortly")
