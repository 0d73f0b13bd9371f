"""Scale-out benchmark: jobs/min with 1 and with 2 ``facesym worker`` processes on PostgreSQL.

For each worker count: a fresh database on a throw-away PostgreSQL 15 server (tests/scaleout/pg_server.py:
Debian's packages, 127.0.0.1, a free port), one ``facesym serve`` with workers = 0 (SCP only) and N
``facesym worker`` processes (one analysis each), all sharing one data folder. The studies (photo pairs:
rest + smile, the same kind as tests/scaleout) are sent in one association by DCMTK storescu; a pynetdicom
SCP on 127.0.0.1 receives the reports. Time = from the first C-STORE to the last job DELIVERED; jobs/min =
studies / that time. Prints a table; asserts nothing.

Run: ``.venv/bin/python bench/scale.py [--studies 30] [--workers 1,2]`` (as root, PostgreSQL runs as the
``postgres`` user). The numbers depend on the machine's cores: on 2 cores, two workers share them with
``serve``, PostgreSQL and storescu.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "scaleout")]

from pg_server import PostgresServer, find_bindir  # noqa: E402
from test_scaleout import Cluster, CountingReceiver, job_rows, make_pair_templates, make_studies  # noqa: E402


def run_once(pg: PostgresServer, templates: tuple[Path, Path], n_workers: int, n_studies: int,
             tmp: Path) -> tuple[float, float]:
    """Seconds from the first C-STORE to the last DELIVERED, and CPU seconds of the workers."""
    studies = make_studies(templates, n_studies, tmp, f"W{n_workers}")
    url = pg.create_database(f"bench_{n_workers}w")
    receiver = CountingReceiver()
    cluster = Cluster.make(tmp, url, receiver.port)
    try:
        cluster.start_serve()
        for _ in range(n_workers):
            cluster.start_worker()
        cluster.wait_ready()
        storescu = shutil.which("storescu")
        if storescu is None:
            raise SystemExit("storescu (DCMTK) not found")
        files = [str(p) for paths in studies.values() for p in paths]
        t0 = time.monotonic()
        command = [storescu, "-R", "-aet", "BENCH", "-aec", "FACESYM", "127.0.0.1", str(cluster.dicom_port)]
        subprocess.run([*command, *files], env=dict(os.environ, TCP_NODELAY="1"), check=True,
                       capture_output=True)
        while sum(state == "DELIVERED" for _, state, _, _ in job_rows(url)) < n_studies:
            if time.monotonic() - t0 > 1800:
                raise SystemExit(f"timed out; logs:\n{cluster.tails()}")
            time.sleep(0.1)
        seconds = time.monotonic() - t0
        cpu = 0.0
        for proc in cluster.workers:
            with open(f"/proc/{proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return seconds, cpu
    finally:
        cluster.stop()
        receiver.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=30, help="studies per run (default 30)")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL not found (apt-get install postgresql-15, or set FACESYM_PG_BINDIR)")
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="facesym-scale-") as tmpdir, PostgresServer(bindir) as pg:
        tmp = Path(tmpdir)
        templates = make_pair_templates(tmp)
        for n in counts:
            run_dir = tmp / f"run{n}"
            run_dir.mkdir()
            seconds, cpu = run_once(pg, templates, n, args.studies, run_dir)
            rows.append((n, seconds, cpu))
            print(f"  {n} worker(s): {args.studies} studies in {seconds:.1f} s", file=sys.stderr)
    base = rows[0][1]
    print(f"scale-out, PostgreSQL {bindir.parent.name}, {os.cpu_count()} CPUs, {args.studies} studies a run "
          f"(a photo pair each: rest + smile; SR + key image + PDF delivered); load average before: "
          f"{load_before:.1f}")
    print(f"{'workers':>7}  {'studies':>7}  {'seconds':>8}  {'jobs/min':>8}  {'speed-up':>8}  "
          f"{'worker CPU s/job':>16}")
    for n, seconds, cpu in rows:
        print(f"{n:>7}  {args.studies:>7}  {seconds:>8.1f}  {60 * args.studies / seconds:>8.1f}  "
              f"{base / seconds:>7.2f}x  {cpu / args.studies:>16.2f}")


if __name__ == "__main__":
    main()
