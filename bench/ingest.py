"""Ingest benchmark: FaceSym's storage SCP beside DCMTK's storescp, with one and the same client.

(a) Small objects: N concurrent associations (default 20) each send M VL Photographic objects (default 50,
    64x64 RGB, ~13 kB, unique UIDs) from a pynetdicom SCU (threads in a few processes, so the client is not
    one GIL); every ``send_c_store`` is timed. Reported: files/s over the whole burst, p50/p99 latency.
(b) One large video: a Video Photographic object of ``--video-mb`` MB (default 300; random bytes in one
    MPEG-4 fragment: neither server decodes it) over one association. Reported: MB/s.

FaceSym runs as ``facesym serve`` (a subprocess, web console off, quiet period long enough that no analysis
starts); its C-STORE answer means fsynced file + committed rows. storescp runs with ``TCP_NODELAY=1``,
``--fork`` (one process per association, else it serves them one at a time), ``+xa`` and its largest PDU
(128 KiB; FaceSym offers 1 MiB); it does NOT fsync. storescp listens on every address, so the bench refuses
to start it outside a private network namespace unless ``--allow-public-listen`` is given. Run::

    unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/ingest.py'

The client works around two pynetdicom 3.0 SCU issues for both servers alike (FaceSym's delivery fixes,
:func:`service.dicom.scu.sends_only`).
``BENCH_FACESYM_CMD`` replaces the server's command line (e.g. a wrapper that profiles it).
Prints a table; asserts nothing (timings belong in benchmarks, not tests).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.uid import MPEG4HP41, ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402

from service.dicom.scu import sends_only  # noqa: E402
from service.media.dicom_io import (  # noqa: E402
    VIDEO_PHOTOGRAPHIC,
    VL_PHOTOGRAPHIC,
    build_video_photographic,
    build_vl_photograph,
)

VERIFICATION = "1.2.840.10008.1.1"
MB = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_private_netns() -> bool:
    """Only the loopback interface is visible (as in tests/conftest.py)."""
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return [line.split(":")[0].strip() for line in lines] == ["lo"]


# ------------------------------------------------------------------------------------------- objects
def make_small(folder: Path, assocs: int, per_assoc: int) -> list[list[Path]]:
    """One study (one series) of ``per_assoc`` small VL photographs per association."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    batches = []
    for a in range(assocs):
        study, series = generate_uid(), generate_uid()
        paths = []
        for i in range(per_assoc):
            ds = build_vl_photograph(rgb, patient_id=f"BENCH{a:02d}", study_uid=study, series_uid=series,
                                     instance_number=i + 1, series_description="Rest")
            path = folder / f"{a:02d}_{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)  # no fsync: input files, not the thing measured
            paths.append(path)
        batches.append(paths)
    return batches


def make_video(path: Path, megabytes: int) -> Path:
    """A Video Photographic object whose one fragment is ``megabytes`` MB of random bytes."""
    payload = os.urandom(megabytes * MB)
    ds = build_video_photographic(payload, width=1280, height=720, n_frames=300, fps=30.0,
                                  series_description="Smile")
    del payload
    ds.save_as(path, enforce_file_format=True)
    return path


# -------------------------------------------------------------------------------------------- servers
@dataclass
class Server:
    name: str
    ae_title: str
    port: int
    proc: subprocess.Popen[bytes]
    store: Path
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _echo(port: int, ae_title: str) -> bool:
    ae = AE(ae_title="BENCHSCU")
    ae.acse_timeout = ae.network_timeout = 2
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    ok = bool(assoc.send_c_echo().get("Status") == 0)
    assoc.release()
    return ok


def _wait_ready(server: Server, timeout: float = 60.0) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name} exited with {server.proc.returncode} before it was ready")
        if _echo(server.port, server.ae_title):
            return server
        time.sleep(0.2)
    server.stop()
    raise SystemExit(f"{server.name} not ready after {timeout:.0f} s")


def start_facesym(work: Path, max_associations: int) -> Server:
    data = work / "facesym-var"
    port = free_port()
    env = dict(
        os.environ,
        FACESYM_DATA_DIR=str(data),
        FACESYM_DICOM_HOST="127.0.0.1",
        FACESYM_DICOM_PORT=str(port),
        FACESYM_MAX_ASSOCIATIONS=str(max_associations),
        FACESYM_WEB_PORT="0",
        FACESYM_QUIET_SECONDS="86400",  # no analysis competes with the ingest
        FACESYM_MIN_FREE_DISK_MB="1",
    )
    facesym = Path(sys.executable).with_name("facesym")
    cmd = [str(facesym), "serve"] if facesym.exists() else [sys.executable, "-m", "service.cli", "serve"]
    if os.environ.get("BENCH_FACESYM_CMD"):  # e.g. a wrapper that profiles the server
        cmd = os.environ["BENCH_FACESYM_CMD"].split()
    log = open(work / "facesym.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server("FaceSym SCP", "FACESYM", port, proc, data / "files",
                    ["Success only after fsync of file and folder and the SQLite commit (synchronous=FULL)",
                     "PDU 1 MiB"])
    return _wait_ready(server)


def start_storescp(work: Path) -> Server:
    exe = shutil.which("storescp")
    if exe is None:
        raise SystemExit("storescp not installed (Debian package dcmtk); or use --skip-dcmtk")
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    log = open(work / "storescp.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [exe, "--fork", "+xa", "-pdu", "131072", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"), stdout=log, stderr=subprocess.STDOUT,
    )
    server = Server("DCMTK storescp", "STORESCP", port, proc, out,
                    ["no fsync (storescp never syncs)", "--fork, PDU 128 KiB (its maximum)", "TCP_NODELAY=1"])
    return _wait_ready(server)


# --------------------------------------------------------------------------------------------- client
def _association_worker(
    port: int, ae_title: str, paths: list[str], barrier: Any, out: dict[str, Any]
) -> None:
    ae = AE(ae_title="BENCHSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(VL_PHOTOGRAPHIC, [ExplicitVRLittleEndian])
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    out["associate_s"] = time.perf_counter() - t0
    latencies: list[float] = []
    statuses: list[int] = []
    if assoc.is_established:
        sends_only(assoc)
    try:
        barrier.wait(120)
        out["start"] = time.perf_counter()
        for path in paths:
            if not assoc.is_established:
                out["error"] = f"association lost after {len(statuses)} objects (aborted: {assoc.is_aborted})"
                break
            t = time.perf_counter()
            rsp = assoc.send_c_store(path)
            latencies.append(time.perf_counter() - t)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
        out["end"] = time.perf_counter()
    except Exception as exc:  # reported in the table's notes, not a crash of the bench
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
    out["latencies"], out["statuses"] = latencies, statuses


def _client_process(port: int, ae_title: str, batches: list[list[str]], barrier: Any, queue: Any) -> None:
    results: list[dict[str, Any]] = [{} for _ in batches]
    threads = [
        threading.Thread(target=_association_worker, args=(port, ae_title, b, barrier, r))
        for b, r in zip(batches, results, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(results)


def run_small(server: Server, batches: list[list[Path]], processes: int) -> dict[str, float]:
    """All associations open, then start sending at once (a barrier); perf_counter is system-wide."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(batches))
    queue = ctx.Queue()
    groups: list[list[list[str]]] = [[] for _ in range(processes)]
    for i, batch in enumerate(batches):
        groups[i % processes].append([str(p) for p in batch])
    procs = [ctx.Process(target=_client_process, args=(server.port, server.ae_title, g, barrier, queue))
             for g in groups if g]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p in procs:
        p.start()
    results = [r for _ in procs for r in queue.get(timeout=600)]
    for p in procs:
        p.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    latencies = sorted(x for r in results for x in r.get("latencies", []))
    statuses = [s for r in results for s in r.get("statuses", [])]
    ends, starts = [r["end"] for r in results if "end" in r], [r["start"] for r in results if "start" in r]
    wall = max(ends) - min(starts) if ends and starts else 0.0
    ok = sum(1 for s in statuses if s == 0)
    errors = sorted({r["error"] for r in results if "error" in r})
    for error in errors:
        server.notes.append(f"client error: {error}")
    return {
        "sent": len(statuses),
        "success": ok,
        "files_s": ok / wall if wall > 0 else 0.0,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0,
        "wall_s": wall,
        "client_cpu_ms": 1000 * client_cpu / max(ok, 1),
    }


def run_video(server: Server, path: Path) -> dict[str, float]:
    ae = AE(ae_title="BENCHSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    ae.add_requested_context(VIDEO_PHOTOGRAPHIC, [MPEG4HP41])
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    if not assoc.is_established:
        raise SystemExit(f"{server.name}: association for the video refused")
    sends_only(assoc)
    try:
        t = time.perf_counter()
        rsp = assoc.send_c_store(str(path))
        seconds = time.perf_counter() - t
    finally:
        assoc.release()
    size = path.stat().st_size
    return {"status": int(rsp.Status) if "Status" in rsp else -1, "mb": size / MB, "seconds": seconds,
            "mb_s": size / MB / seconds}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its reaped children (storescp's forked ones), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def stored_files(server: Server) -> int:
    return sum(1 for p in server.store.rglob("*") if p.is_file() and ".incoming" not in p.parts)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--assocs", type=int, default=20, help="concurrent associations (small objects)")
    ap.add_argument("--per-assoc", type=int, default=50, help="small objects per association")
    ap.add_argument("--client-procs", type=int, default=4, help="client processes (threads share them)")
    ap.add_argument("--video-mb", type=int, default=300, help="size of the large video (MB); 0 skips it")
    ap.add_argument("--skip-dcmtk", action="store_true", help="FaceSym only")
    ap.add_argument("--skip-facesym", action="store_true", help="storescp only")
    ap.add_argument("--allow-public-listen", action="store_true",
                    help="start storescp (listens on every address) outside a private network namespace")
    ap.add_argument("--tmp", help="work folder's parent (default: the system temp dir)")
    args = ap.parse_args(argv)
    if not args.skip_dcmtk and not in_private_netns() and not args.allow_public_listen:
        print("storescp listens on every address: run under `unshare -n sh -c 'ip link set lo up && ...'`,"
              " or pass --allow-public-listen, or --skip-dcmtk", file=sys.stderr)
        return 2

    load = os.getloadavg()
    rows: list[tuple[str, dict[str, float], dict[str, float] | None, int, list[str]]] = []
    with tempfile.TemporaryDirectory(prefix="facesym-ingest-", dir=args.tmp) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        batches = make_small(work / "small", args.assocs, args.per_assoc)
        video = make_video(work / "video.dcm", args.video_mb) if args.video_mb > 0 else None
        print(f"inputs: {args.assocs} x {args.per_assoc} VL photos "
              f"({batches[0][0].stat().st_size / 1000:.1f} kB each)"
              + (f", video {video.stat().st_size / MB:.0f} MB" if video else "")
              + f", made in {time.perf_counter() - t:.1f} s", flush=True)
        starters = []
        if not args.skip_facesym:
            starters.append(lambda: start_facesym(work, args.assocs + 5))
        if not args.skip_dcmtk:
            starters.append(lambda: start_storescp(work))
        for start in starters:
            server = start()
            try:
                print(f"{server.name}: small objects ...", flush=True)
                cpu = cpu_seconds(server.proc.pid)
                small = run_small(server, batches, args.client_procs)
                time.sleep(0.5)  # storescp's children exit and are reaped after their release
                small["cpu_ms"] = 1000 * (cpu_seconds(server.proc.pid) - cpu) / max(small["success"], 1)
                big = None
                if video is not None:
                    print(f"{server.name}: video ...", flush=True)
                    cpu = cpu_seconds(server.proc.pid)
                    big = run_video(server, video)
                    time.sleep(0.5)
                    big["cpu_s"] = cpu_seconds(server.proc.pid) - cpu
            finally:
                server.stop()
            rows.append((server.name, small, big, stored_files(server), server.notes))
            shutil.rmtree(server.store, ignore_errors=True)

    n = args.assocs * args.per_assoc
    print()
    print(f"small objects: {args.assocs} concurrent associations x {args.per_assoc} VL photos = {n}; "
          f"client: pynetdicom SCU, {args.client_procs} processes")
    head = f"{'server':<16} {'ok':>9} {'files/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/file':>11}"
    if args.video_mb > 0:
        head += f" {'video MB':>8} {'s':>6} {'MB/s':>7} {'CPU s':>6}"
    print(head + f" {'files':>6}")
    for name, small, big, files, _ in rows:
        line = (f"{name:<16} {int(small['success']):>4}/{int(small['sent']):<4} {small['files_s']:>8.1f} "
                f"{small['p50_ms']:>7.1f} {small['p99_ms']:>7.1f} {small['cpu_ms']:>11.1f}")
        if big is not None:
            ok = "" if big["status"] == 0 else f" (status 0x{big['status']:04X})"
            line += f" {big['mb']:>8.0f} {big['seconds']:>6.2f} {big['mb_s']:>7.1f} {big['cpu_s']:>6.2f}{ok}"
        print(line + f" {files:>6}")
    by = {name: (small, big) for name, small, big, _, _ in rows}
    if "FaceSym SCP" in by and "DCMTK storescp" in by:
        (fs, fv), (ds, dv) = by["FaceSym SCP"], by["DCMTK storescp"]
        ratio = f"small {fs['files_s'] / ds['files_s']:.2f}x"
        if fv is not None and dv is not None:
            ratio += f", video {fv['mb_s'] / dv['mb_s']:.2f}x"
        print(f"FaceSym / storescp: {ratio}")
    if "FaceSym SCP" in by:
        fs, fv = by["FaceSym SCP"]
        goals = [f"small >= 200 files/s: {'met' if fs['files_s'] >= 200 else 'MISSED'}"]
        if "DCMTK storescp" in by and fv is not None and by["DCMTK storescp"][1] is not None:
            dv = by["DCMTK storescp"][1]
            assert dv is not None
            met = "met" if fv["mb_s"] >= 0.5 * dv["mb_s"] else "MISSED"
            goals.append(f"video >= 0.5x storescp MB/s: {met}")
        print("goals: " + "; ".join(goals))
    print("notes:")
    for name, _, _, _, notes in rows:
        print(f"  {name}: " + "; ".join(notes))
    print(f"  {os.cpu_count()} CPUs, load average before the run {load[0]:.2f}; client and server share them")
    print("  CPU = the server process's user + system time (storescp: with its forked children) per object")
    print("  files = stored files counted after the run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
