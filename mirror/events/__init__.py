"""Events: what happens in the mirror, told to webhooks and kept in an audit trail.

`Events` is the one emitter, handed to the constructors of what emits (tiers, eviction
passes, the upstream client, manifests and blobs, the HTTP handlers, bundles and the admin
commands). Each kind has a method (kinds.py) that says what its data holds; with no webhook
and no audit log wanting a kind (routes.py), that method returns at its first line and
builds nothing.

What "emitted" means: an event is emitted once its line is in this process's journal
(journal.py), a compact line (record.py) written by the emitter itself, on the loop; nothing
is encoded, no thread woken, nothing awaited. A line is written at once, before the emitter
returns, unless the journal was written less than FLUSH_SECONDS (10 ms) ago: then it waits,
with every line that comes meanwhile, for one write(2) 10 ms after the last. A pull that
waits so waits as what it is made of (kinds.Pulls), or, the same as the pull waiting last
but for its time, as its time alone; its line is built at that write, with the fields it
shares with other pulls of the same manifest (its head) and of the same client (its tail)
built once and kept, and the pulls of one head that follow one another in one line (a run:
each further pull only its time, its tail when it differs): built between two requests, a
line cost a busy server's pull path some 7 µs; kept as a tuple it cost under 2, and built
at the write about 1.3 more; kept as a time in a run and joined at the write, a pull costs
the loop some 0.4 µs in a tight loop (0.8 as a tuple each). A process serving a few
pulls a second so writes each pull's line before the pull is answered; one serving thousands
writes a hundred times a second instead of thousands (each append to a file on ext4 cost the
pull path ten times what its own microsecond suggests: a busy mirror lost a tenth of its
manifest rate to them). What a kill -9 can take is the lines of the last 10 ms; a stop
writes them all. `mirror_events_emitted_total` counts the events written (kept in plain
integers and added to the counter every second and before each scrape, since a Prometheus
increment per pull would cost more than the append).

The journals are the queues: delivery (delivery.py), in whichever serving process holds the
delivery lock, reads every process's journal forward from each consumer's cursor (feed.py:
one per webhook, one for the audit log), encodes (cloudevents.py) what it sends or writes,
and moves the cursor once that is done with: at least once, in order per journal, merged
across journals by when the events were emitted. The audit log is written so, shortly after
the pull, off the loop; nothing is lost meanwhile, since the journal holds it.

An admin command writes a journal of its own, which the serving deliverer reads; at its
close, when no mirror delivers (the delivery lock is free), it writes the audit log itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from time import time_ns
from typing import Any

from mirror.bounded import Bounded
from mirror.config import EVENT_KINDS, EventsConfig, webhook_name
from mirror.errors import ConfigError
from mirror.events import cursors, record
from mirror.events.audit import AuditFile
from mirror.events.cloudevents import Envelope
from mirror.events.feed import Consumer, Journals, Taken
from mirror.events.journal import SINGLE, Journal, command_name, journal_name
from mirror.events.kinds import Answered, Kinds, Pulls, Target
from mirror.events.record import RUN, RUN_PULLS
from mirror.events.routes import Route, routes
from mirror.locks import FileLock
from mirror.metrics import Metrics
from mirror.oci.reference import Digest

__all__ = ["AUDIT", "Events"]

log = logging.getLogger("mirror.events")

#: The audit log's cursor, among the webhooks' (`webhook:<name>`).
AUDIT = "audit"
#: Most lines the audit log takes from the journals in one write.
AUDIT_LINES = 1000
#: Lines that come less than this many seconds after the last write of the journal wait and
#: go together this long after it (a busy process: at most 1/FLUSH_SECONDS writes a second).
FLUSH_SECONDS = 0.01
#: Most pull-line heads kept (one per manifest and reference pulled: record.pull_head).
PULL_HEADS = 4096
#: Seconds between the additions of what was appended to `mirror_events_emitted_total`.
TALLY_SECONDS = 1.0


class Events(Kinds):
    """The emitter (see the module docstring). Emit on the event loop, or, in an admin
    command, from its threads; `close` releases the journal.

    `journals`: the directory of every process's journal; `cursors_path`: the consumers'
    cursors file; `deliver_lock`: the delivery lock (delivery.py); `serving`: a serving
    process's (its journal named by `worker`, this process's index among several, None: the
    only one), else an admin command's; `emits`: False for the deliverer of worker processes
    (a process of its own, which delivers and writes the audit log but emits nothing, and so
    holds no journal)."""

    def __init__(
        self,
        config: EventsConfig,
        metrics: Metrics,
        journals: Path,
        cursors_path: Path,
        deliver_lock: Path,
        serving: bool = False,
        worker: int | None = None,
        emits: bool = True,
    ) -> None:
        self._metrics = metrics
        self.config = config
        self.endpoints = tuple(webhook_name(h) for h in config.webhooks)
        self._routes: dict[str, Route] = routes(config)
        #: (upstream, repository, reference, digest, media type) → its pull lines' head.
        self._pull_heads: Bounded[tuple[str, str, str, Digest, str], str] = Bounded(PULL_HEADS)
        #: (method, client, user, outcome) → its pull lines' tail.
        self._pull_tails: Bounded[tuple[str, str | None, str | None, str], str] = Bounded(
            PULL_HEADS
        )
        self.journals = journals
        self.cursors_path = cursors_path
        self.deliver_lock = deliver_lock
        self.serving = serving
        metrics.prefill_events(EVENT_KINDS, self.endpoints)
        self._journal: Journal | None = None
        self.audit: AuditFile | None = None
        #: Held while the audit log is written or reopened (the deliver thread, SIGHUP).
        self.audit_lock = threading.Lock()
        self.envelope = Envelope(config.source or f"urn:mirror:{socket.gethostname()}")
        #: Lines appended since the last tally, by kind.
        self._appended: dict[str, int] = dict.fromkeys(self._routes, 0)
        #: Whether the last append failed (logged once, until one succeeds).
        self._failing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        #: Lines (and pulls) waiting for their write, when the last write was (loop time).
        self._pending: list[str | Pulls] = []
        #: The pulls last in `_pending`, which a pull alike joins (None: a line is last).
        self._open: Pulls | None = None
        self._written_at = float("-inf")
        self._flushing: asyncio.TimerHandle | None = None
        self._tally: asyncio.TimerHandle | None = None
        if not self._routes:
            return
        if config.audit_log:
            try:
                self.audit = AuditFile(config.audit_log, config.audit_max_bytes, config.audit_keep)
            except OSError as e:
                raise ConfigError(f"events.audit_log: cannot open it: {e.strerror}") from e
        if emits:
            self._journal = self._claim(journal_name(worker) if serving else command_name())

    def _claim(self, name: str) -> Journal:
        """Blocking, at start: this process's journal, or a ConfigError naming who has it."""
        try:
            journal = Journal(self.journals, name)
            claimed = journal.claim()
        except OSError as e:
            raise ConfigError(f"events: cannot open the event journal {self.journals}: {e}") from e
        if not claimed:
            where = "a single mirror" if name == SINGLE else name
            raise ConfigError(
                f"events: another process writes the event journal {journal.directory} "
                f"({where}): only one may serve this data directory as that"
            )
        return journal

    # -- the emitter -----------------------------------------------------------------------

    def emit(self, kind: str, data: dict[str, Any], subject: str | None = None) -> None:
        """Journal the event now (see the module docstring)."""
        if kind in self._routes:
            self._append(record.line(kind, record.payload(subject, data)))

    def pull(
        self,
        target: Target,
        reference: str,
        manifest: Answered,
        method: str,
        client: str | None,
        user: str | None,
        outcome: str,
    ) -> None:
        """Journal a pull (kinds.py): on a busy loop, where lines wait already nearly always,
        it waits as it is, only its time when it is the same as the pull waiting last (up to
        RUN_PULLS of them), and its line is built at the write."""
        if "pull" not in self._routes:
            return
        at = time_ns()
        key = (target, reference, manifest, method, client, user, outcome)
        last = self._open
        if last is not None and last[0] == key and len(last[1]) < RUN_PULLS:
            last[1].append(at)
            return
        pulls = (key, [at])
        if self._pending:
            self._pending.append(pulls)
            self._open = pulls
        else:
            self._append(pulls)

    def _append(self, entry: str | Pulls) -> None:
        """Journal one line (or a pull, its line to build): at once (one write(2)), unless
        the last write was less than FLUSH_SECONDS ago on this loop; then with the others
        that come meanwhile, in one write FLUSH_SECONDS after it (see the module docstring).
        A disk that will not take it costs the events (logged once until the journal takes
        one again, counted per webhook), never the caller."""
        journal = self._journal
        if journal is None:
            return
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_thread:
            if self._pending:
                self._pending.append(entry)
                self._open = None if isinstance(entry, str) else entry
                return
            now = loop.time()
            due = self._written_at + FLUSH_SECONDS
            if now < due:
                self._pending.append(entry)
                self._open = None if isinstance(entry, str) else entry
                self._flushing = loop.call_at(due, self._flush)
                return
            self._written_at = now
        self._write(journal, [entry])

    def _flush(self) -> None:
        """Write what waits, in one write(2)."""
        self._flushing = None
        entries = self._pending
        if not entries:
            return
        self._pending = []
        self._open = None
        if self._loop is not None:
            self._written_at = self._loop.time()
        if self._journal is not None:
            self._write(self._journal, entries)

    def _write(self, journal: Journal, entries: Sequence[str | Pulls]) -> None:
        """The lines of `entries` in one write(2); the pulls' built now (record.pull_line,
        inline): from the head and the tail they share with others, a run of pulls of one
        head in one line."""
        texts: list[str] = []
        add = texts.append
        pulls = 0
        tails = self._pull_tails
        last_target: object = None
        last_manifest: object = None
        last_reference = head = tail = ""
        last_tail: tuple[object, ...] = ()
        first = run = 0  # the open pull line's first time and its pulls (0: none open)
        sep = RUN
        kinds: dict[str, int] = {}
        for entry in entries:  # one pass, the shared parts looked up only when they change
            if isinstance(entry, str):
                if run:
                    add("\n")
                    run = 0
                add(entry)
                kind = entry.partition("\t")[0]
                kinds[kind] = kinds.get(kind, 0) + 1
                continue
            key, times = entry
            count = len(times)
            pulls += count
            target, reference, manifest, _, _, _, _ = key
            same = (
                target is last_target and manifest is last_manifest and reference == last_reference
            )
            if not same:
                head = self._pull_head(target, reference, manifest)
                last_target, last_manifest, last_reference = target, manifest, reference
            ends = key[3:]
            if ends != last_tail:
                found = tails.get(ends)
                tail = found if found is not None else tails.remember(ends, record.pull_tail(*ends))
                last_tail = ends
            at = times[0]
            if same and run > 0 and run + count <= RUN_PULLS:  # the same head, another tail
                add(f"{sep}{at - first}\t{tail}")
            else:
                add(f"\npull\t{at}\t{head}{tail}" if run else f"pull\t{at}\t{head}{tail}")
                first, run = at, 0
            if count > 1:  # the pulls alike after it: only their times
                add(sep)
                add(sep.join([str(t - first) for t in times[1:]]))
            run += count
        if run:
            add("\n")
        if pulls:
            kinds["pull"] = pulls
        try:
            journal.append("".join(texts).encode())
        except OSError as e:
            if not self._failing:
                self._failing = True
                log.error("the event journal cannot be written (%s): events are lost", e)
            for kind, count in kinds.items():
                for name in self._routes[kind].endpoints:
                    self._metrics.events_lost(name, "unwritable", count)
            return
        self._failing = False
        for kind, count in kinds.items():
            self._appended[kind] += count

    def _pull_head(self, target: Target, reference: str, manifest: Answered) -> str:
        """The fields every pull of `manifest` by `reference` shares (record.pull_head),
        built once and kept."""
        key = (target.upstream.name, target.repo, reference, manifest.digest, manifest.media_type)
        head = self._pull_heads.get(key)
        if head is None:
            tag = None if ":" in reference else reference  # a digest has one, a tag never
            head = record.pull_head(
                target.upstream.name,
                target.repo,
                tag,
                manifest.digest,
                manifest.media_type,
                len(manifest.data),
            )
            head = self._pull_heads.remember(key, head)
        return head

    def tally(self) -> None:
        """Add what was appended since the last tally to `mirror_events_emitted_total`."""
        appended = self._appended
        for kind, count in appended.items():
            if count:
                appended[kind] = 0
                self._metrics.event_emitted(kind, count)

    def attach(self) -> None:
        """Tally every TALLY_SECONDS on the running loop, and let lines that come close
        together on it wait for one write (the server, at start)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tick()

    def _tick(self) -> None:
        self.tally()
        if self._loop is not None:
            self._tally = self._loop.call_later(TALLY_SECONDS, self._tick)

    def detach(self) -> None:
        """Stop tallying on the loop and write what waits (the server, at stop); `close`
        tallies the rest."""
        if self._flushing is not None:
            self._flushing.cancel()
        self._flush()
        self._loop = None
        if self._tally is not None:
            self._tally.cancel()
            self._tally = None

    def reopen(self) -> None:
        """Reopen the audit log (SIGHUP, after logrotate), on a thread of its own: it waits
        for a write of the deliverer's in progress."""
        if self.audit is not None:
            threading.Thread(target=self._reopen, name="audit-reopen", daemon=True).start()

    def _reopen(self) -> None:
        audit = self.audit
        assert audit is not None
        with self.audit_lock:
            try:
                audit.reopen()
                log.info("audit log reopened: %s", audit.path)
            except OSError as e:
                log.error(
                    "cannot reopen the audit log %s, writing on to the old file: %s", audit.path, e
                )

    def close(self) -> None:
        """Blocking: tally, write the audit log from the journals if this is a command and
        no mirror delivers, and release the journal and the audit log."""
        self.tally()
        journal, self._journal = self._journal, None
        if journal is not None:
            journal.close()
            if not self.serving and self.audit is not None:
                self._audit_alone()
        if self.audit is not None:
            self.audit.close()

    def _audit_alone(self) -> None:
        """A command's audit lines, when no serving process is there to write them: under the
        delivery lock, as the deliverer would (what a mirror that starts later would write)."""
        lock = FileLock(self.deliver_lock)
        try:
            if not lock.try_take():
                return  # a mirror delivers: it writes them within a second
            places = cursors.load(self.cursors_path)
            consumer = Consumer(AUDIT, self.audit_kinds(), places.get(AUDIT, {}))
            journals = Journals(self.journals)
            journals.refresh()
            while self.write_audit(journals, consumer):
                pass
            places[AUDIT] = consumer.cursor
            cursors.save(self.cursors_path, places)
        except OSError as e:
            log.error("the audit log cannot be written from the event journals: %s", e)
        finally:
            lock.close()

    # -- for delivery (blocking: the deliver thread's) --------------------------------------

    def wanted(self, endpoint: str) -> list[str]:
        """The kinds a webhook wants."""
        return [kind for kind, route in self._routes.items() if endpoint in route.endpoints]

    def audit_kinds(self) -> list[str]:
        return [kind for kind, route in self._routes.items() if route.audit]

    def encode(self, line: bytes, ident: str) -> list[tuple[float, str]] | None:
        """A journal line's events (several for a run of pulls), each as when it was emitted
        and its CloudEvents text, the first's id `ident`; None for a line cut short
        (logged)."""
        try:
            found = record.decode(line, ident)
        except (ValueError, UnicodeDecodeError):
            log.error("a line of the event journal is cut short: skipped (%r)", line[:80])
            return None
        encode = self.envelope.encode
        return [
            (r.at, r.text if r.data is None else encode(r.kind, r.id, r.data, r.subject, r.at))
            for r in found
        ]

    def write_audit(self, journals: Journals, consumer: Consumer) -> bool:
        """Write the next lines the audit log wants and move its cursor past them (lines the
        disk will not take are lost, logged: never blocking the journals behind them);
        whether there were any."""
        taken: Taken = consumer.take(journals, AUDIT_LINES)
        if not taken.lines:
            consumer.advance(taken)
            return False
        bodies: list[str] = []
        for _, name, end, line in taken.lines:
            events = self.encode(line, journals.ident(name, end, line))
            if events is not None:
                bodies.extend(text for _, text in events)
        audit = self.audit
        assert audit is not None
        with self.audit_lock:
            try:
                audit.write(bodies)
            except OSError as e:
                log.error("the audit log cannot be written (%s): %d lines lost", e, len(bodies))
        consumer.advance(taken)
        return True
