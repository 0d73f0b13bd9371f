"""The running service: storage SCP + APScheduler clock + a bounded worker pool, all over one database.

APScheduler only ticks; the job table is the queue, so a crash loses nothing: every tick re-reads what is
due. Jobs and deliveries are claimed with a lease that a heartbeat renews; an expired lease (its worker was
killed) lets any worker take the row over. On SQLite (one machine, one process analysing) ``facesym serve``
also puts RUNNING jobs back to QUEUED at start-up; on a shared PostgreSQL it leaves them to their leases.

Scale-out: ``facesym serve`` with ``workers = 0`` receives only (SCP + web console), and any number of
``facesym worker`` processes (:class:`FaceSymService` with ``receive=False``: no SCP, no web, no syslog
forwarder) on any machines sharing the database and the file store analyse and deliver.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler

from service.audit import AuditTrail, SyslogForwarder, application_activity, forwarder_from_settings
from service.audit.anchor import AuditAnchor
from service.config import Settings
from service.engine import ENGINE_VERSION
from service.jobs.analysis import analyse_study, with_limits
from service.jobs.worker import (
    Analyser,
    WorkerContext,
    claim_next_job,
    database_dialect,
    deliver_due,
    mark_receiver_started,
    process_job,
    promote_stable_studies,
    recover_interrupted,
)
from service.store.db import open_database, utcnow
from service.store.files import FileStore

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)


class _ExpectedSkips(logging.Filter):
    """Drop APScheduler's WARNING that a tick was skipped because the previous one still runs: with
    ``max_instances=1`` and ``coalesce`` that is the design (a delivery or an analysis hand-off that takes
    longer than ``poll_seconds``), and it would otherwise fill the service log every half second."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "skipped: maximum number of running instances" not in str(record.msg)


logging.getLogger("apscheduler.scheduler").addFilter(_ExpectedSkips())


class FaceSymService:
    """``facesym serve``: receive, analyse, report and deliver until stopped; with ``settings.workers == 0``
    it only receives. ``receive=False`` is ``facesym worker``: analyse and deliver only."""

    def __init__(
        self, settings: Settings, analyser: Analyser = analyse_study, *, receive: bool = True
    ) -> None:
        self.settings = settings
        self.receive = receive
        self.analyse = settings.workers > 0
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.sessions = open_database(settings.effective_database_url)
        self.files = FileStore(settings.files_dir)
        self.audit = AuditTrail(self.sessions, source_id=settings.audit_source_id,
                                anchor=AuditAnchor(settings.data_dir))
        self.ctx = WorkerContext(
            settings, self.sessions, self.files, ENGINE_VERSION, f"{socket.gethostname()}:{os.getpid()}",
            with_limits(analyser, settings.decode_limits, settings.engine_params), self.audit,
        )
        self._forwarder: SyslogForwarder | None = None
        self._web: Any = None
        self._pool = ThreadPoolExecutor(max(1, settings.workers), thread_name_prefix="facesym-worker")
        self._slots = threading.BoundedSemaphore(max(1, settings.workers))
        self._scheduler = BackgroundScheduler(timezone=UTC)
        self._scp: ThreadedAssociationServer | None = None

    def start(self) -> None:
        ae = self.settings.ae_title
        if self.receive:
            # Senders could not reach us while we were down: a study that was still arriving gets a whole
            # quiet period from now (in every process that promotes), else a modality's resend after our
            # restart would find it analysed (and reported) half-received.
            mark_receiver_started(self.sessions)
            self._forwarder = forwarder_from_settings(self.audit, self.settings)
        self.audit.record(application_activity("start", local_ae=ae))
        if self.receive:  # one process notes the configuration (workers would note theirs alternately)
            self.audit.note_settings(self.settings.audit_view(), local_ae=ae)  # secrets: salted slow hashes
            # Objects acknowledged in associations that our stop or crash cut short (no association is open
            # yet: nothing of this start is caught).
            self.audit.transfers.record_unaudited(before=utcnow(), local_ae=ae)
        if self.receive and self.analyse and database_dialect(self.sessions) == "sqlite":
            recover_interrupted(self.sessions)  # single machine: a RUNNING job's worker was this process
        if self.receive:
            self._start_receiving()
        if self.analyse:
            self._start_loop()
        if not self.receive:
            log.info("FaceSym %s worker %s: %d analyses at once, lease %gs", ENGINE_VERSION,
                     self.ctx.worker_id, self.settings.workers, self.settings.lease_seconds)

    def _start_receiving(self) -> None:
        from service.dicom.scp import start_scp

        self._scp = start_scp(self.settings, self.sessions, self.files, ENGINE_VERSION, self.audit)
        if self.settings.web_port:
            from service.api import ServiceHooks, start_web

            hooks = ServiceHooks(engine_version=ENGINE_VERSION)
            try:
                self._web = start_web(self.settings, self.sessions, self.audit, hooks)
            except OSError as exc:  # the port is taken (or not ours): say which, with nothing left running
                from service.dicom.scp import stop as stop_scp
                from service.errors import InvalidParameterError

                stop_scp(self._scp)
                self._scp = None
                host, port = getattr(self.settings, "web_host", "127.0.0.1"), self.settings.web_port
                raise InvalidParameterError(
                    f"port {port} (web_port) on {host} cannot be opened: {exc.strerror}"
                    + (" (another program, or another facesym serve, is listening there: stop it or choose "
                       "another web_port, or 0 for no console)" if exc.errno == errno.EADDRINUSE else "")
                ) from None
        log.info("FaceSym %s listening as %s on %s:%d; destinations: %s%s", ENGINE_VERSION,
                 self.settings.ae_title, self.settings.dicom_host, self.settings.dicom_port,
                 ", ".join(map(str, self.settings.destinations)) or "none",
                 "" if self.analyse else "; workers = 0: analysis and delivery left to `facesym worker`s")

    def _start_loop(self) -> None:
        every = max(0.1, self.settings.poll_seconds)
        now = datetime.now(UTC)
        self._scheduler.add_job(self._dispatch, "interval", seconds=every, max_instances=1, coalesce=True,
                                next_run_time=now, id="dispatch")
        self._scheduler.add_job(self._deliver, "interval", seconds=every, max_instances=1, coalesce=True,
                                next_run_time=now, id="deliver")
        self._scheduler.start()

    def _dispatch(self) -> None:
        try:
            promote_stable_studies(self.sessions, self.settings.quiet_seconds)
        except Exception:  # noqa: BLE001 - e.g. the database is briefly unreachable; the next tick retries
            log.exception("promoting quiet studies failed")
        while self._slots.acquire(blocking=False):
            try:
                job_id = claim_next_job(self.sessions, self.ctx.worker_id,
                                        lease_seconds=self.settings.lease_seconds,
                                        max_attempts=self.settings.max_attempts)
            except Exception:  # noqa: BLE001 - as above
                self._slots.release()
                log.exception("claiming a job failed")
                return
            if job_id is None:
                self._slots.release()
                return
            self._pool.submit(self._run, job_id)

    def _run(self, job_id: int) -> None:
        try:
            process_job(self.ctx, job_id)
        except Exception:  # noqa: BLE001 - logged; the job stays RUNNING until its lease expires
            log.exception("job %d: worker crashed", job_id)
        finally:
            self._slots.release()

    def _deliver(self) -> None:
        try:
            deliver_due(self.ctx)
        except Exception:  # noqa: BLE001 - the next tick retries
            log.exception("delivery tick failed")

    def stop(self) -> None:
        if self._web is not None:
            self._web.stop()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._scp is not None:
            self._scp.shutdown()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.audit.record(application_activity("stop", local_ae=self.settings.ae_title))
        if self._forwarder is not None:
            self._forwarder.stop(timeout=5)
        log.info("FaceSym stopped")
