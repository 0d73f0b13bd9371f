"""Measurement validity: the corpus of :mod:`service.phantom.corpus`, truth vs measured, motion off and on.

Usage::

    .venv/bin/python bench/validity.py [--corpus DIR] [--faces DIR] [--baseline-root CHECKOUT] [--quick]

Makes the corpus in DIR (default ``.bench/validity``; kept, so later runs only analyse), analyses every
case with this checkout's engine and prints, per case, truth vs measured AI, CI and weaker side, then per
split (tune / validation) and head motion (off / on): median |ΔAI| and its 90th percentile, side
accuracy (truth AI ≥ 0.3), symmetric false alarms (AI > 0.15), healthy-real false alarms (AI ≥ 0.3) and
frozen halves found by ``--task auto`` (smile found, AI ≥ 0.8, frozen side named) and the weaker side of
real-clip partial palsies (one half at 0.5 of its motion, ``--task auto``; no exact AI).

``--baseline-root`` analyses the same files with another checkout's engine too (e.g. a ``git worktree``
of an older commit) and prints its summary beside. ``--quick`` runs a small subset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# An engine root given by a parent run (the baseline) wins over this checkout.
sys.path.insert(0, os.environ.get("FACESYM_ENGINE_ROOT", str(ROOT)))


def analyse(corpus: Path, out: Path) -> None:
    """Analyse every case in ``corpus`` (its ``*.json`` manifests) with the importable engine."""
    from service.cli import analyze_path
    from service.domain import Task
    from service.errors import FaceSymError

    rows = []
    for manifest in sorted(corpus.glob("*.json")):
        case = json.loads(manifest.read_text())
        task = None if case["analyse_task"] is None else Task(case["analyse_task"])
        t0 = time.perf_counter()
        try:
            doc = analyze_path(str(manifest.with_suffix(".mp4")), None, task, False, False)
            error = None
        except FaceSymError as exc:
            doc, error = {"quality": {"ok": False}, "tasks": []}, str(exc)
        found = [t["task"] for t in doc.get("tasks", [])]
        match = [t for t in doc.get("tasks", []) if t["task"] == case["task"]]
        res = match[0] if match else {}
        rows.append({
            **case, "found": found, "ok": bool(doc["quality"]["ok"]), "error": error,
            "ai": res.get("asymmetry_index"), "ci": res.get("cosine_index"),
            "weaker": res.get("weaker_side"), "method": res.get("method"),
            "grade": (res.get("grade") or {}).get("label"),
            "seconds": round(time.perf_counter() - t0, 2),
        })
        print(f"  {case['name']}: AI {rows[-1]['ai']} weaker {rows[-1]['weaker']} found {found}",
              file=sys.stderr, flush=True)
    out.write_text(json.dumps(rows, indent=1))


def _percentile(v: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(v, q)) if v else float("nan")


def _mild(label: str | None) -> bool:
    """A House–Brackmann label of grade I or II (the grader's labels end in the Roman numeral)."""
    return label is not None and label.split()[-1] in ("I", "II")


def summary(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The figures of one group of cases (strings, for the table)."""
    import numpy as np

    known = [r for r in rows if r["truth_ai"] is not None and r["kind"] == "warp"]
    err = [abs((r["ai"] if r["ai"] is not None else 0.0) - r["truth_ai"]) for r in known]
    sided = [r for r in known if r["truth_ai"] >= 0.3]
    sym = [r for r in known if r["truth_ai"] == 0.0]
    healthy = [r for r in rows if r["kind"] == "healthy"]
    frozen = [r for r in rows if r["kind"] == "freeze"]
    found = [r for r in frozen if r["ai"] is not None and r["ai"] >= 0.8 and r["weaker"] == r["truth_weaker"]]
    partial = [r for r in rows if r["kind"] == "partial"]
    worst_sym = max((r["ai"] or 0.0 for r in sym), default=float("nan"))
    return {
        "cases": str(len(rows)),
        "median err": f"{float(np.median(err)):.3f}" if err else "–",
        "p90 err": f"{_percentile(err, 90):.3f}" if err else "–",
        "side right": f"{sum(r['weaker'] == r['truth_weaker'] for r in sided)}/{len(sided)}",
        "sym AI>0.15": f"{sum((r['ai'] or 0.0) > 0.15 for r in sym)}/{len(sym)} (max {worst_sym:.2f})",
        "healthy AI≥0.3": f"{sum(r['ai'] is None or r['ai'] >= 0.3 for r in healthy)}/{len(healthy)}",
        "frozen found": f"{len(found)}/{len(frozen)}",
        "partial side right": f"{sum(r['weaker'] == r['truth_weaker'] for r in partial)}/{len(partial)}",
        "sym graded I–II": f"{sum(_mild(r.get('grade')) for r in sym)}/{len(sym)}",
    }


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        motion = "off" if r["motion"] == "off" else "on"
        for split in (r["split"], "all"):
            groups.setdefault(f"{split}, motion {motion}", []).append(r)
    order = [f"{s}, motion {m}" for s in ("tune", "validation", "all") for m in ("off", "on")]
    return {k: groups[k] for k in order if k in groups}


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> str:
    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    base = {r["name"]: r for r in baseline or []}
    header = ["case", "split", "truth AI", "AI", "CI", "weaker (truth)", "weaker", "found", "grade"]
    if baseline:
        header += ["baseline AI", "baseline weaker"]
    body = []
    for r in rows:
        row = [r["name"], r["split"], fmt(r["truth_ai"]), fmt(r["ai"]), fmt(r["ci"]),
               r["truth_weaker"] or "–", r["weaker"] or "–", ",".join(r["found"]) or "none",
               r.get("grade") or "–"]
        if baseline:
            b = base.get(r["name"], {})
            row += [fmt(b.get("ai")), b.get("weaker") or "–"]
        body.append(row)
    out = [_table(header, body), ""]
    figures = list(summary([]).keys())
    sums = []
    for name, group in _groups(rows).items():
        sums.append([name, "this engine"] + list(summary(group).values()))
        if baseline:
            names = {r["name"] for r in group}
            same = [b for b in baseline if b["name"] in names]
            sums.append([name, "baseline"] + list(summary(same).values()))
    out.append(_table(["group", "engine"] + figures, sums))
    # The same by task (warp phantoms, all faces), so that a weak measurement is not averaged away.
    keep = ["cases", "median err", "p90 err", "side right", "sym AI>0.15", "sym graded I–II"]
    by_task = []
    for task in ("smile", "eye_closure", "brow_raise"):
        for motion in ("off", "on"):
            sel = [r for r in rows if r["kind"] == "warp" and r["task"] == task
                   and (r["motion"] == "off") == (motion == "off")]
            engines = [("this engine", sel)]
            if baseline:
                names = {r["name"] for r in sel}
                engines.append(("baseline", [b for b in baseline if b["name"] in names]))
            for engine, group in engines:
                fig = summary(group)
                by_task.append([f"{task}, motion {motion}", engine] + [fig[k] for k in keep])
    out += ["", _table(["task", "engine"] + keep, by_task)]
    return "\n".join(out)


QUICK = ("man-smile-1-1-", "man-smile-1-0.7-", "astronaut-smile-0.4-1-", "single_face-healthy-",
         "single_face-frozen-left-off", "wolfgang-frozen-right-off")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / ".bench" / "validity")
    ap.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    ap.add_argument("--extra", type=Path, default=ROOT / "var" / "test-clips",
                    help="clips of scripts/fetch_test_clips.py")
    ap.add_argument("--baseline-root", type=Path, help="another checkout whose engine is analysed too")
    ap.add_argument("--baseline-results", type=Path,
                    help="instead of --baseline-root: a results file an earlier --baseline-root run left")
    ap.add_argument("--quick", action="store_true", help="a small subset (minutes, not an hour)")
    ap.add_argument("--analyse-only", type=Path, help=argparse.SUPPRESS)  # internal: the baseline's run
    args = ap.parse_args()
    if args.analyse_only:
        analyse(args.corpus, args.analyse_only)
        return 0

    from service.phantom import corpus

    all_cases = corpus.cases()
    if args.quick:
        all_cases = [c for c in all_cases if c.name.startswith(QUICK)]
    args.corpus.mkdir(parents=True, exist_ok=True)
    for stale in args.corpus.glob("*.json"):
        if stale.stem not in {c.name for c in all_cases}:
            stale.unlink()  # a case from another selection: not analysed this time (its clip is kept)
    for case in all_cases:
        corpus.make_case(case, corpus.Sources(args.faces, args.extra, args.corpus))
        print(f"made {case.name}", file=sys.stderr, flush=True)
    (args.corpus / "results").mkdir(exist_ok=True)
    results = args.corpus / "results" / "this.json"
    analyse(args.corpus, results)
    rows = json.loads(results.read_text())
    baseline = None
    if args.baseline_results:
        baseline = json.loads(args.baseline_results.read_text())
    elif args.baseline_root:
        base_out = args.corpus / "results" / "baseline.json"
        env = dict(os.environ, FACESYM_ENGINE_ROOT=str(args.baseline_root.resolve()),
                   PYTHONPATH=str(args.baseline_root.resolve()))
        subprocess.run([sys.executable, __file__, "--corpus", str(args.corpus), "--analyse-only",
                        str(base_out)], env=env, check=True)
        baseline = json.loads(base_out.read_text())
    print(report(rows, baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
