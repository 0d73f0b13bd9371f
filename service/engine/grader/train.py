"""``facesym train``: fit the grader on a labelled manifest, with patient-grouped cross-validation.

Manifest: a CSV with columns ``path`` (a video clip / DICOM video, or an ``.npz`` of landmark tracks:
see :mod:`service.engine.grader.data`; relative paths are relative to the CSV's folder), ``task``
(smile | eye_closure | brow_raise; recorded, not an input of the model), ``grade`` (a class label,
"I".."VI" by default, or its 1-based number) and optionally ``patient_id``. Rows of one patient are
never split across training and validation; without ``patient_id`` every row is its own group.

What it does, deterministically for a given seed (numpy ``default_rng(seed)``, ``torch.manual_seed``,
``torch.use_deterministic_algorithms(True)``; the same machine and thread count give identical
weights): k-fold cross-validation over patient groups (k = min(folds, number of patients); groups are
shuffled with the seed and dealt to the fold with the fewest rows so far), then one final fit on every
row, then (optionally) an evaluation of the final model on a separate held-out test manifest. Each fit:
AdamW, one-cycle learning rate, batches of 64, loss = cross-entropy (label smoothing 0.05) + 0.5 x the
expected distance in grades between the predicted distribution and the true grade (grades are ordered,
so "III" for a true "II" is a smaller error than "VI"); augmentation:
left/right swap (a mirror image has the same grade) and landmark noise.

Writes ``out_dir/<name>/<version>/``: ``weights.pt`` (state_dict), ``metadata.json``, ``metrics.json``,
``model_card.md`` and ``SHA256SUMS`` (sha256 of every other file), through a temporary folder renamed
into place at the end.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.grader import features as F
from service.engine.grader.data import load_pairs
from service.engine.grader.infer import sha256_hex
from service.engine.grader.synth import HB_CLASSES
from service.errors import InvalidParameterError, UnreadableInputError

#: ``progress(stage, done, total)``: stage is "loading", "cv fold i/k", "final" or "test".
Progress = Callable[[str, int, int], None]
TASKS = ("smile", "eye_closure", "brow_raise")
AUG_NOISE_D = 0.001


@dataclass(frozen=True)
class Row:
    path: Path
    task: str
    grade: str
    patient: str


@dataclass(frozen=True)
class FitConfig:
    epochs: int
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    ordinal_weight: float = 0.5


def _grade_label(raw: str, classes: Sequence[str], where: str) -> str:
    g = raw.strip()
    if g.upper().startswith("HB"):
        g = g[2:].strip(" -")
    for c in classes:
        if g.upper() == c.upper():
            return c
    if g.isdigit() and 1 <= int(g) <= len(classes):
        return classes[int(g) - 1]
    raise InvalidParameterError(
        f"{where}: grade {raw!r} is not one of {list(classes)} (or 1..{len(classes)})"
    )


def read_manifest(path: str | Path, classes: Sequence[str] = HB_CLASSES) -> list[Row]:
    """The rows of a training manifest (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise UnreadableInputError(f"manifest not found: {p}")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip() for c in reader.fieldnames or []}
        missing = {"path", "task", "grade"} - cols
        if missing:
            raise InvalidParameterError(f"{p}: manifest lacks column(s) {sorted(missing)}")
        rows = []
        for n, rec in enumerate(reader, 2):
            rec = {k.strip(): (v or "").strip() for k, v in rec.items() if k}
            where = f"{p}:{n}"
            task = rec["task"]
            if task not in TASKS:
                raise InvalidParameterError(f"{where}: task {task!r} is not one of {list(TASKS)}")
            rp = Path(rec["path"])
            rp = rp if rp.is_absolute() else p.parent / rp
            patient = rec.get("patient_id") or f"row:{rec['path']}"
            rows.append(Row(rp, task, _grade_label(rec["grade"], classes, where), patient))
    if not rows:
        raise InvalidParameterError(f"{p}: manifest has no rows")
    return rows


def group_folds(groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of every row; all rows of a group share a fold.

    Groups are shuffled with ``seed`` and dealt, largest first, to the fold with the fewest rows.
    """
    uniq, counts = np.unique(np.asarray(groups, dtype=str), return_counts=True)
    if k < 2 or k > len(uniq):
        raise InvalidParameterError(f"cannot make {k} folds from {len(uniq)} patient group(s)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    fold_of: dict[str, int] = {}
    sizes = np.zeros(k, dtype=int)
    for i in order:
        f = int(np.argmin(sizes))
        fold_of[str(uniq[i])] = f
        sizes[f] += counts[i]
    return np.asarray([fold_of[g] for g in groups], dtype=int)


def _augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = batch.astype(np.float64)
    flip = rng.random(len(out)) < 0.5
    if flip.any():
        sw = out[flip][:, :, ::-1].copy()
        sw[..., 0] = -sw[..., 0]
        out[flip] = sw
    return out + rng.normal(0.0, AUG_NOISE_D, out.shape)


def _fit(
    res: np.ndarray,
    y: np.ndarray,
    idx: np.ndarray,
    n_classes: int,
    fit: FitConfig,
    seed: int,
    report: Callable[[int, int], None] | None,
) -> Any:
    import torch

    from service.engine.grader.model import GraderNet

    cfg = _model_config(n_classes)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = GraderNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    per_epoch = math.ceil(len(idx) / fit.batch_size)
    total = max(1, fit.epochs * per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=fit.lr, total_steps=total, pct_start=0.25)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=fit.label_smoothing)
    ranks = torch.arange(n_classes, dtype=torch.float64)
    step = 0
    net.train()
    for _ in range(fit.epochs):
        perm = rng.permutation(idx)
        for b in range(per_epoch):
            sel = perm[b * fit.batch_size : (b + 1) * fit.batch_size]
            if len(sel) < 2:  # BatchNorm needs two samples
                continue
            sym, mot = F.streams(_augment(res[sel], rng))
            logits, _ = net(torch.from_numpy(sym), torch.from_numpy(mot))
            target = torch.from_numpy(y[sel])
            # grades are ordered: also penalise the expected distance (in grades) from the true one
            dist = (ranks[None, :] - target[:, None].double()).abs()
            expected = (torch.softmax(logits.double(), dim=1) * dist).sum(dim=1).mean()
            loss = loss_fn(logits, target) + fit.ordinal_weight * expected.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if report:
                report(step, total)
    return net.eval()


def _model_config(n_classes: int) -> Any:
    from service.engine.grader.model import ModelConfig

    return ModelConfig(
        n_classes=n_classes,
        in_channels=F.N_CHANNELS,
        n_pairs=F.N_PAIRS,
        n_frames=F.N_FRAMES,
        motion_features=F.MOTION_FEATURES,
    )


def _predict(net: Any, res: np.ndarray) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for b in range(0, len(res), 256):
            sym, mot = F.streams(res[b : b + 256])
            logits, _ = net(torch.from_numpy(sym), torch.from_numpy(mot))
            out.append(torch.softmax(logits.double(), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def metrics(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class recall/precision, confusion matrix (rows true, columns predicted), mean
    absolute grade error, within-one-grade accuracy, accuracy per task."""
    k = len(classes)
    pred = probs.argmax(axis=1)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    t = np.asarray(tasks)
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "within_one_grade": float((np.abs(pred - y) <= 1).mean()) if len(y) else float("nan"),
        "mean_abs_grade_error": float(np.abs(pred - y).mean()) if len(y) else float("nan"),
        "recall": {c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)},
        "precision": {
            c: (float(cm[i, i] / predicted[i]) if predicted[i] else None) for i, c in enumerate(classes)
        },
        "support": {c: int(support[i]) for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "accuracy_by_task": {
            task: float((pred[t == task] == y[t == task]).mean()) for task in TASKS if (t == task).any()
        },
    }


def _load_rows(rows: list[Row], stage: str, progress: Progress | None) -> tuple[np.ndarray, bool]:
    res = np.empty((len(rows), F.N_FRAMES, 2, F.N_PAIRS, 2), dtype=np.float32)
    all_synthetic = True
    for i, row in enumerate(rows):
        pairs, synthetic = load_pairs(row.path)
        all_synthetic &= synthetic
        res[i] = F.fill_and_resample(pairs)
        if progress:
            progress(stage, i + 1, len(rows))
    return res, all_synthetic


def train(
    manifest_csv: Path,
    out_dir: Path,
    *,
    name: str = "facesym-grader",
    version: str,
    seed: int = 0,
    epochs: int,
    progress: Progress | None = None,
    folds: int = 5,
    test_manifest: Path | None = None,
    classes: Sequence[str] = HB_CLASSES,
    batch_size: int = 64,
    lr: float = 3e-3,
    trained_on: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Train the grader on ``manifest_csv`` and write the model to ``out_dir/name/version``.

    Parameters
    ----------
    folds
        Cross-validation folds over patient groups (fewer when there are fewer patients; CV is skipped
        with fewer than 2 patients or ``folds < 2``).
    test_manifest
        Optional held-out manifest: the final model's metrics on it go into the card.
    trained_on
        What the model learnt from, stated in every grade it gives; default: "synthetic" when every row
        is a synthetic ``.npz`` (see :mod:`~service.engine.grader.data`), else "labelled exams".
    overwrite
        Replace an existing ``out_dir/name/version`` (refused by default).

    Returns
    -------
    Path
        The model directory.
    """
    import torch

    if epochs < 1:
        raise InvalidParameterError(f"epochs must be >= 1, got {epochs}")
    if not version or "/" in version or not name or "/" in name:
        raise InvalidParameterError("name and version must be non-empty folder names")
    classes = tuple(classes)
    target = Path(out_dir) / name / version
    if target.exists() and not overwrite:
        raise InvalidParameterError(f"{target} already exists; choose another version")
    rows = read_manifest(manifest_csv, classes)
    res, all_synthetic = _load_rows(rows, "loading", progress)
    y = np.asarray([classes.index(r.grade) for r in rows], dtype=np.int64)
    tasks = [r.task for r in rows]
    groups = [r.patient for r in rows]
    fit = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr)
    n_groups = len(set(groups))
    k = min(folds, n_groups)

    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng():
            cv: dict[str, Any] | None = None
            if k >= 2:
                fold = group_folds(groups, k, seed)
                probs = np.zeros((len(rows), len(classes)))
                per_fold = []
                for f in range(k):
                    tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
                    stage = f"cv fold {f + 1}/{k}"
                    net = _fit(res, y, tr, len(classes), fit, seed + 1 + f, _reporter(progress, stage))
                    probs[te] = _predict(net, res[te])
                    m = metrics(y[te], probs[te], classes, [tasks[i] for i in te])
                    per_fold.append(
                        {
                            "fold": f + 1,
                            "patients": sorted({groups[i] for i in te}),
                            "n_train": int(len(tr)),
                            "n_test": int(len(te)),
                            "accuracy": m["accuracy"],
                            "within_one_grade": m["within_one_grade"],
                        }
                    )
                cv = {"k": k, "folds": per_fold, "pooled": metrics(y, probs, classes, tasks)}
            net = _fit(res, y, np.arange(len(rows)), len(classes), fit, seed, _reporter(progress, "final"))
            test: dict[str, Any] | None = None
            if test_manifest is not None:
                test_rows = read_manifest(test_manifest, classes)
                tres, _ = _load_rows(test_rows, "test", progress)
                ty = np.asarray([classes.index(r.grade) for r in test_rows], dtype=np.int64)
                test = metrics(ty, _predict(net, tres), classes, [r.task for r in test_rows])
                test["manifest"] = Path(test_manifest).name
                test["patients"] = sorted({r.patient for r in test_rows})
                test["patients_also_in_training"] = sorted(set(test["patients"]) & set(groups))
    finally:
        torch.use_deterministic_algorithms(prev_det)

    origin = trained_on or ("synthetic" if all_synthetic else "labelled exams")
    metadata = {
        "name": name,
        "version": version,
        "classes": list(classes),
        "trained_on": origin,
        "seed": seed,
        "epochs": epochs,
        "landmarks": {
            "left": list(F.LEFT_POINTS),
            "right": list(F.RIGHT_POINTS),
            "regions": {k_: list(v) for k_, v in F.REGIONS.items()},
        },
        "inputs": {
            "feature_version": F.FEATURE_VERSION,
            "n_frames": F.N_FRAMES,
            "rest_frames": F.REST_FRAMES,
            "map_scale": F.MAP_SCALE,
            "motion_percentile": F.MOTION_PERCENTILE,
            "min_motion_d": F.MIN_MOTION_D,
            "velocity_scale": F.VELOCITY_SCALE,
            "symmetry_shape": [F.N_CHANNELS, F.N_FRAMES, F.N_PAIRS],
            "motion_shape": [F.N_FRAMES, F.MOTION_FEATURES],
        },
        "model": _model_config(len(classes)).to_dict(),
        "training": {
            "manifest": Path(manifest_csv).name,
            "manifest_sha256": sha256_hex(Path(manifest_csv).read_bytes()),
            "rows": len(rows),
            "patients": n_groups,
            "rows_per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
            "batch_size": batch_size,
            "lr": lr,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    all_metrics = {"cross_validation": cv, "test": test}
    return _write_model(target, net, metadata, all_metrics, overwrite)


def _reporter(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def _write_model(
    target: Path, net: Any, metadata: dict[str, Any], all_metrics: dict[str, Any], overwrite: bool
) -> Path:
    import torch

    tmp = target.with_name(f".{target.name}.part")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(net.state_dict(), tmp / "weights.pt")
    (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(all_metrics, indent=2, sort_keys=True) + "\n")
    (tmp / "model_card.md").write_text(model_card(metadata, all_metrics, (tmp / "weights.pt").stat().st_size))
    lines = [
        f"{sha256_hex(p.read_bytes())}  {p.name}\n" for p in sorted(tmp.iterdir()) if p.name != "SHA256SUMS"
    ]
    (tmp / "SHA256SUMS").write_text("".join(lines))
    if target.exists() and overwrite:
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"


def _metrics_md(m: dict[str, Any], classes: Sequence[str]) -> list[str]:
    out = [
        f"- rows: {m['n']}; accuracy **{_pct(m['accuracy'])}**; "
        f"within one grade {_pct(m['within_one_grade'])}; "
        f"mean absolute grade error {m['mean_abs_grade_error']:.2f}",
        "- accuracy by task: " + ", ".join(f"{t} {_pct(v)}" for t, v in m["accuracy_by_task"].items()),
        "",
        "| class | support | recall | precision |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {c} | {m['support'][c]} | {_pct(m['recall'][c])} | {_pct(m['precision'][c])} |" for c in classes
    ]
    out += ["", "Confusion matrix (rows: true grade, columns: predicted):", ""]
    out.append("| true \\ pred | " + " | ".join(classes) + " |")
    out.append("|---" * (len(classes) + 1) + "|")
    for c, row in zip(classes, m["confusion_matrix"], strict=True):
        out.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return out


def model_card(metadata: dict[str, Any], all_metrics: dict[str, Any], weights_bytes: int) -> str:
    """The model card (Markdown) written next to the weights."""
    classes = metadata["classes"]
    tr = metadata["training"]
    synthetic = metadata["trained_on"] == "synthetic"
    lines = [
        f"# Model card: {metadata['name']} {metadata['version']}",
        "",
        "**Intended use: research only. This model does NOT diagnose.** Its grade is a machine estimate "
        "for research on facial-palsy grading; it must not guide treatment and is not a medical device.",
        "",
        f"Trained on: **{metadata['trained_on']}**"
        + (
            " - synthetic palsy sequences made from landmark tracks of healthy faces; "
            "no patient data. Every grade it gives says so."
            if synthetic
            else ""
        ),
        "",
        "## Model",
        "",
        "Two streams over 96 resampled frames of normalised FaceMesh landmarks (nose-tip origin, unit = "
        "inter-eye distance, x toward the patient's left): (1) a symmetry map over "
        f"{len(metadata['landmarks']['left'])} left/right landmark pairs (brow, forehead, periocular, "
        "perioral) through an SE-Residual CNN; (2) frame-to-frame landmark displacements through a BiLSTM "
        "with additive attention over time; fusion by an MLP.",
        f"Classes (mildest first): {', '.join(classes)} (House-Brackmann by default). "
        f"Weights: {weights_bytes / 1e6:.2f} MB (float32 state_dict). Seed {metadata['seed']}, "
        f"{metadata['epochs']} epochs, torch {tr['torch']}.",
        "",
        "## Data",
        "",
        f"Manifest `{tr['manifest']}` (sha256 `{tr['manifest_sha256'][:16]}...`): {tr['rows']} sequences "
        f"from {tr['patients']} patient group(s); rows per class: "
        + ", ".join(f"{c} {n}" for c, n in tr["rows_per_class"].items())
        + ".",
    ]
    if synthetic:
        lines += [
            "",
            "Generator (`service/engine/grader/synth.py`, `scripts/make_grader_data.py`): FaceMesh tracks "
            "of warp phantoms (three real people's photos, each also mirrored; symmetric movement of each "
            "task) and of a real clip of a healthy smile; a palsy is made by keeping a fraction of the "
            "weaker side's motion (I >= 0.9, II 0.7-0.9, III 0.45-0.7, IV 0.25-0.45, V 0.05-0.25, "
            "VI < 0.05), with a random amount of detector leak across the midline, plus a static droop of "
            "the weaker brow and mouth corner for V-VI (slight at most for IV), and jitter of amplitude, "
            "face shape, timing, residual head pose and landmark noise. Further sequences come from "
            "phantoms rendered with the weakness in the pixels (labelled by the rendered fraction) and "
            "from the real clip with one half of the face frozen (grade VI). Renders in which FaceMesh "
            "did not follow the movement on the moving side are left out (mostly eye closures: "
            "FaceMesh's lids often stay open on a warped closing eye).",
            "",
            "Assumptions: one number (the motion fraction) defines the grade; the grade is that of the "
            "clip's single task; the whole weaker side is weakened alike. Not modelled: synkinesis, "
            "contracture, Bell's phenomenon, branch palsies, bilateral palsy, real patients' head motion.",
        ]
    cv = all_metrics.get("cross_validation")
    lines += ["", "## Metrics", ""]
    if cv:
        lines += [
            f"### Patient-grouped {cv['k']}-fold cross-validation (each fold's patients unseen in training)",
            "",
        ]
        lines += [
            f"- fold {f['fold']} (held out: {', '.join(f['patients'])}; {f['n_test']} rows): "
            f"accuracy {_pct(f['accuracy'])}, within one grade {_pct(f['within_one_grade'])}"
            for f in cv["folds"]
        ]
        lines += ["", "Pooled over folds:", ""] + _metrics_md(cv["pooled"], classes)
    else:
        lines += ["Cross-validation: not run (fewer than 2 patient groups or folds < 2)."]
    test = all_metrics.get("test")
    if test:
        lines += [
            "",
            "### Held-out test set (final model)",
            "",
            f"Manifest `{test['manifest']}`, none of whose rows is in the training manifest; patients: "
            f"{', '.join(test['patients'])}"
            + (
                f" ({', '.join(test['patients_also_in_training'])} also in training, with other "
                "sequences: the cross-validation above is the estimate for unseen people)."
                if test["patients_also_in_training"]
                else " (none in training)."
            ),
            "",
        ] + _metrics_md(test, classes)
    lines += [
        "",
        "## Limitations",
        "",
        "- Trained on synthetic sequences"
        + (" only" if synthetic else "")
        + "; accuracy on real patients is unknown. The synthetic grades are defined by a motion fraction, "
        "which is a simplification of the House-Brackmann scale (a whole-face, clinician-judged grade).",
        "- Few distinct faces (three people); faces, lighting, age and ethnicity of real patients are not "
        "represented.",
        "- FaceMesh landmarks under-read one-sided weakness (the landmark model follows the moving side), "
        "most for the smile; grades from landmark tracks may be milder than the truth.",
        "- Eye closure is the weakest task: FaceMesh's lid landmarks move little (0.01-0.03 D) and "
        "sometimes not at all, so eye-closure grades lean on the rest droop and are unreliable.",
        "- Grades II and III are hard to tell from I and each other (ratios of 0.7-0.9 vs >= 0.9 are "
        "within FaceMesh's left/right bias on a healthy face); read the probabilities, not just the label.",
        "- Expects a clip that starts at rest and shows one task (smile, eye closure or brow raise).",
        "",
        "## Files",
        "",
        "`weights.pt` (state_dict), `metadata.json` (classes, landmark set, input sizes, architecture), "
        "`metrics.json`, this card; `SHA256SUMS` lists the sha256 of each, and inference refuses files "
        "that do not match.",
        "",
    ]
    return "\n".join(lines)
