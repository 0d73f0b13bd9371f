"""Figures a clinician reads at the viewer: key image, motion plot, optical-flow region overlay.

Pure functions: arrays and domain objects in, RGB arrays out (:func:`png_bytes` makes a PNG of one).
Drawn with matplotlib's Agg canvas directly (no pyplot, no screen, no global backend switch), so they
are safe in the worker and in threads.

Sides are the PATIENT's (DESIGN.md, "Sides and coordinates"). The figures never assume where a side
lies in the picture: the "L" and "R" labels are placed where the patient's left and right landmarks
are, so a frontal non-mirrored camera shows L on the image's right, and a mirrored input (already
flipped back by the decoder) stays correct too. Colours: the patient's left is orange, the right
sky-blue (Okabe–Ito, readable with colour-blindness).

No PHI: figures carry the task, the scores and frame numbers only (no name, ID, birth date or date).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Polygon

from service.domain import Side, Task, TaskResult
from service.engine import flow as fl
from service.engine import normalize as nz
from service.engine import tasks as tk
from service.errors import InvalidParameterError

#: Colour of the patient's left / right (RGB 0-255): arrows, landmarks, curves, "L"/"R" labels.
SIDE_RGB: dict[Side, tuple[int, int, int]] = {Side.LEFT: (230, 159, 0), Side.RIGHT: (86, 180, 233)}
DPI = 100
#: (width, height) in pixels of each figure.
KEY_IMAGE_SIZE = (800, 860)
MOTION_PLOT_SIZE = (800, 420)
FLOW_OVERLAY_SIZE = (800, 860)

TASK_TITLE = {Task.SMILE: "Smile", Task.EYE_CLOSURE: "Eye closure", Task.BROW_RAISE: "Brow raise"}
SIGNAL_NAME = {
    Task.SMILE: "commissure excursion (D)",
    Task.EYE_CLOSURE: "eye closure (fraction of rest area)",
    Task.BROW_RAISE: "brow lift (D)",
}
#: Landmarks a face hardly moves in any task: nasal dorsum, inner canthi, face outline at eye level.
_STABLE = tuple(sorted(set(fl.STABLE_LANDMARKS) | set(tk.STABLE)))
_MIN_ARROW_PX = 0.5


def _hex(side: Side) -> str:
    r, g, b = SIDE_RGB[side]
    return f"#{r:02x}{g:02x}{b:02x}"


def side_name(side: Side | None) -> str:
    return "none" if side is None else f"patient's {side.value}"


def _figure(size: tuple[int, int]) -> Figure:
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _rgb(fig: Figure) -> np.ndarray:
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3].copy()


def png_bytes(rgb: np.ndarray) -> bytes:
    """A PNG of an (H, W, 3) uint8 image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_check_rgb(rgb, "rgb")).save(buf, format="PNG")
    return buf.getvalue()


def _check_rgb(rgb: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InvalidParameterError(f"{name} must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    return arr


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != nz.N_LANDMARKS or arr.shape[1] < 2:
        raise InvalidParameterError(f"{name} must be ({nz.N_LANDMARKS}, 2) pixel landmarks, got {arr.shape}")
    arr = arr[:, :2]
    if not np.isfinite(arr).all():
        raise InvalidParameterError(f"{name} holds non-finite landmarks")
    return arr


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (scale, rotation, translation) mapping ``src`` onto ``dst`` (Umeyama)."""
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.diag([1.0, float(np.sign(np.linalg.det(u @ vt)) or 1.0)])
    rot = u @ d @ vt
    var = float((a**2).sum() / len(src))
    scale = float(np.trace(np.diag(sig) @ d) / var) if var > 0 else 1.0
    return scale, rot, mu_d - scale * rot @ mu_s


def _crop_box(points: np.ndarray, shape: tuple[int, ...], margin: float = 0.22) -> tuple[int, int, int, int]:
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    h, w = shape[:2]
    return (
        max(0, int(x0 - mx)),
        max(0, int(y0 - 1.3 * my)),  # room above the brows for the labels
        min(w, int(math.ceil(x1 + mx))),
        min(h, int(math.ceil(y1 + my))),
    )


def _show_face(ax: Axes, rgb: np.ndarray, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    ax.imshow(rgb[y0:y1, x0:x1], extent=(x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5), interpolation="bilinear")
    ax.set_xlim(x0 - 0.5, x1 - 0.5)
    ax.set_ylim(y1 - 0.5, y0 - 0.5)
    ax.set_axis_off()


def _outlined(color: str = "white", width: float = 3.0) -> list[patheffects.AbstractPathEffect]:
    return [patheffects.withStroke(linewidth=width, foreground=color)]


def _side_labels(ax: Axes, points: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """"L"/"R" where the patient's left/right eyes are, near the top of the crop."""
    x0, y0, x1, y1 = box
    for side, eye in ((Side.LEFT, nz.LEFT_EYE_CONTOUR), (Side.RIGHT, nz.RIGHT_EYE_CONTOUR)):
        cx = float(points[list(eye), 0].mean())
        outer = cx + 0.35 * (cx - float(points[nz.NOSE_TIP, 0]))
        ax.text(
            float(np.clip(outer, x0 + 0.06 * (x1 - x0), x1 - 0.06 * (x1 - x0))),
            y0 + 0.06 * (y1 - y0),
            "L" if side is Side.LEFT else "R",
            color=_hex(side),
            fontsize=30,
            fontweight="bold",
            ha="center",
            va="center",
            path_effects=_outlined("black", 3.5),
        )


def _scores_line(task: TaskResult) -> str:
    return (
        f"AS {task.asymmetry_score:.1f}   CS {task.cosine_score:.1f}   AI {task.asymmetry_index:.2f}   "
        f"gate {task.activation_gate:.2f}   weaker side: {side_name(task.weaker_side)}"
    )


def _caption(fig: Figure, lines: Sequence[str], top: float) -> None:
    fig.text(0.03, top, "\n".join(lines), ha="left", va="top", fontsize=11, linespacing=1.5, wrap=True)


def _orientation_note(points: np.ndarray) -> str:
    left_x = float(points[list(nz.LEFT_EYE_CONTOUR), 0].mean())
    right_x = float(points[list(nz.RIGHT_EYE_CONTOUR), 0].mean())
    where = "right" if left_x > right_x else "left"
    return f"L/R = the patient's left/right (the patient's left is on the image's {where})."


#: What :func:`key_image_with_marks` locates per side: the landmark group at rest (mapped into the peak
#: frame) and at peak, and the group's mean rest → peak vector as drawn (×gain).
MARK_KINDS = ("rest", "peak", "vector")

#: Per (side, kind): (N, 2) float image coordinates (column, row) of the figure's pixels, PS3.3 C.18.6.1.2
#: style (the top-left pixel's outer corner is (0, 0)): where the figure draws them.
Marks = dict[tuple[Side, str], np.ndarray]


def key_image(
    peak_rgb: np.ndarray, rest_points: np.ndarray, peak_points: np.ndarray, task: TaskResult
) -> np.ndarray:
    """The peak frame with the task's landmarks, the rest → peak arrows and the scores
    (:func:`key_image_with_marks` without the marks)."""
    return key_image_with_marks(peak_rgb, rest_points, peak_points, task)[0]


def rest_in_frame(rest_points: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(478, 2) rest landmarks mapped into another frame (``points``, (478, 2+) pixels) by a similarity
    fitted on stable landmarks (nasal dorsum, inner canthi, face outline at eye level): so head motion
    between the frames is not drawn as facial movement."""
    stable = list(_STABLE)
    rest, cur = np.asarray(rest_points)[:, :2], np.asarray(points)[:, :2]
    scale, rot, shift = _similarity(rest[stable], cur[stable])
    return np.asarray((scale * (rot @ rest.T)).T + shift)


def key_image_with_marks(
    peak_rgb: np.ndarray, rest_points: np.ndarray, peak_points: np.ndarray, task: TaskResult
) -> tuple[np.ndarray, Marks]:
    """The peak frame with the task's landmarks, the rest → peak displacement arrows and the scores.

    Parameters
    ----------
    peak_rgb
        (H, W, 3) uint8: a frame of the task's peak interval.
    rest_points, peak_points
        (478, 2+) pixel landmarks of a rest frame and of ``peak_rgb``. The rest landmarks are mapped into
        the peak frame with a similarity fitted on stable landmarks (nasal dorsum, inner canthi, face
        outline at eye level), so head motion between the frames is not drawn as facial movement.
    task
        The task's result (its scores go into the caption).

    Returns
    -------
    tuple[np.ndarray, Marks]
        (860, 800, 3) uint8 RGB. Arrows are scaled by the integer shown in the caption (×1 when the
        movement is visible as it is) so that a small brow lift can be seen. The marks say where in
        that image each side's landmark group (rest, peak) and its mean arrow ("vector") lie, for the
        SR's spatial coordinates (:data:`MARK_KINDS`), clipped to the face's panel.
    """
    rgb = _check_rgb(peak_rgb, "peak_rgb")
    rest = _check_points(rest_points, "rest_points")
    peak = _check_points(peak_points, "peak_points")
    rest_in_peak = rest_in_frame(rest, peak)
    left_idx, right_idx = tk.groups(task.task)
    eye_px = float(np.linalg.norm(np.subtract(*nz.eye_centres(peak[None])).ravel()))
    disp = peak - rest_in_peak
    moved = np.linalg.norm(disp[list(left_idx) + list(right_idx)], axis=1)
    biggest = float(moved.max()) if moved.size else 0.0
    gain = int(np.clip(math.floor(0.3 * eye_px / biggest), 1, 5)) if biggest > _MIN_ARROW_PX else 1

    fig = _figure(KEY_IMAGE_SIZE)
    fig.text(0.5, 0.985, f"FaceSym key image: {TASK_TITLE[task.task]}", ha="center", va="top",
             fontsize=15, fontweight="bold")
    ax = fig.add_axes((0.02, 0.175, 0.96, 0.765))
    box = _crop_box(peak, rgb.shape)
    _show_face(ax, rgb, box)
    for side, idx in ((Side.LEFT, left_idx), (Side.RIGHT, right_idx)):
        colour = _hex(side)
        pts = peak[list(idx)]
        ax.scatter(pts[:, 0], pts[:, 1], s=14, c=colour, edgecolors="black", linewidths=0.5, zorder=3)
        for i in idx:
            d = disp[i]
            if float(np.hypot(*d)) <= _MIN_ARROW_PX:
                continue
            start = rest_in_peak[i]
            ax.add_patch(
                FancyArrowPatch(
                    tuple(start), tuple(start + gain * d), arrowstyle="-|>", mutation_scale=10,
                    color=colour, linewidth=2.0, zorder=4, shrinkA=0, shrinkB=0,
                )
            )
    _side_labels(ax, peak, box)
    method = "pixel motion" if task.method == "pixels" else "landmark positions"
    lines = [
        _scores_line(task),
        f"movement ({task.unit}): left {task.left:.3f}, right {task.right:.3f}  (measured on {method})",
        f"arrows: rest → peak ×{gain}, rest frames {task.rest_frames[0]}–{task.rest_frames[1]}, "
        f"peak frames {task.peak_frames[0]}–{task.peak_frames[1]}",
        _orientation_note(peak),
    ]
    if task.insufficient_activation:
        lines.append(f"insufficient activation (gate {task.activation_gate:.2f} < 1): scores are limited")
    _caption(fig, lines, 0.16)
    image = _rgb(fig)
    marks: Marks = {}
    for side, idx in ((Side.LEFT, left_idx), (Side.RIGHT, right_idx)):
        rows = list(idx)
        start = rest_in_peak[rows].mean(axis=0)
        for kind, pts in (("rest", rest_in_peak[rows]), ("peak", peak[rows]),
                          ("vector", np.stack([start, start + gain * disp[rows].mean(axis=0)]))):
            marks[(side, kind)] = _figure_pixels(ax, pts[:, :2], image.shape, box)
    return image, marks


def _figure_pixels(
    ax: Axes, points: np.ndarray, shape: tuple[int, ...], box: tuple[int, int, int, int]
) -> np.ndarray:
    """(N, 2) source-frame pixels → (column, row) of the drawn figure (after ``canvas.draw``), clipped
    to the face panel ``box`` so that a mark never points outside the picture."""
    x0, y0, x1, y1 = box
    inside = np.column_stack([np.clip(points[:, 0], x0 - 0.5, x1 - 0.5),
                              np.clip(points[:, 1], y0 - 0.5, y1 - 0.5)])
    xy = ax.transData.transform(inside)  # display pixels, origin bottom-left
    return np.column_stack([xy[:, 0], shape[0] - xy[:, 1]])


def motion_plot(
    task: TaskResult,
    fps: float,
    gate: tuple[float, float],
    attention: Sequence[float] | None = None,
) -> np.ndarray:
    """Left and right movement signals over time, rest and peak shaded, the gate's a0/a1 drawn.

    Parameters
    ----------
    task
        Its ``series`` holds (left, right) per frame from ``rest_frames[0]`` (NaN where not measured).
    fps
        Frame rate; time is frame / fps seconds. 0 or less: the x axis counts frames.
    gate
        (a0, a1): the activation gate's noise floor and full-activation thresholds in the task's unit.
    attention
        Optional grader attention weights over the same span (any length; stretched to it).

    Returns
    -------
    np.ndarray
        (420, 800, 3) uint8 RGB.
    """
    series = np.asarray(task.series, dtype=np.float64).reshape(-1, 2)
    if len(series) == 0:
        raise InvalidParameterError("task.series is empty: nothing to plot")
    a0, a1 = (float(g) for g in gate)
    first = task.rest_frames[0]
    per = 1.0 / fps if fps > 0 else 1.0
    t = (first + np.arange(len(series))) * per

    def span(r: tuple[int, int]) -> tuple[float, float]:
        return (r[0] - 0.5) * per, (r[1] + 0.5) * per

    fig = _figure(MOTION_PLOT_SIZE)
    ax = fig.add_axes((0.09, 0.24, 0.82, 0.68))
    ax.axvspan(*span(task.rest_frames), color="0.8", alpha=0.6, label="rest", zorder=0)
    ax.axvspan(*span(task.peak_frames), color="#ffe680", alpha=0.6, label="peak", zorder=0)
    ax.axhline(a0, color="0.4", linestyle=":", linewidth=1.2, label=f"a0 = {a0:g} (noise floor)")
    ax.axhline(a1, color="0.2", linestyle="--", linewidth=1.2, label=f"a1 = {a1:g} (full activation)")
    for col, side in ((0, Side.LEFT), (1, Side.RIGHT)):
        ax.plot(t, series[:, col], color=_hex(side), linewidth=2.2, label=f"patient's {side.value}")
    handles, labels = ax.get_legend_handles_labels()
    if attention is not None and len(attention) > 0:
        att = np.asarray(attention, dtype=np.float64)
        tx = ax.twinx()
        ta = np.linspace(t[0], t[-1], len(att))
        tx.fill_between(ta, 0, att, color="#8e6bbf", alpha=0.25, step="mid", label="grader attention")
        top = float(np.nanmax(att)) if np.isfinite(att).any() else 1.0
        tx.set_ylim(0, max(top, 1e-9) * 1.05)
        tx.set_ylabel("grader attention", color="#6a4c93")
        tx.tick_params(axis="y", colors="#6a4c93")
        ax.set_zorder(tx.get_zorder() + 1)
        ax.patch.set_visible(False)
        more = tx.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.set_xlabel("time (s)" if fps > 0 else "frame", labelpad=2)
    ax.set_ylabel(SIGNAL_NAME[task.task])
    ax.grid(alpha=0.3)
    ax.set_title(
        f"{TASK_TITLE[task.task]}: movement per side   (AS {task.asymmetry_score:.1f}, "
        f"gate {task.activation_gate:.2f})",
        fontsize=12,
    )
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=9,
               frameon=False)
    return _rgb(fig)


def flow_overlay(rest_rgb: np.ndarray, rest_points: np.ndarray, task: TaskResult) -> np.ndarray:
    """The six optical-flow regions over the face, filled by their motion VS, with SS per region.

    Parameters
    ----------
    rest_rgb, rest_points
        (H, W, 3) uint8 rest frame and its (478, 2+) pixel landmarks.
    task
        A result whose ``flow`` is not empty.

    Returns
    -------
    np.ndarray
        (860, 800, 3) uint8 RGB.
    """
    if not task.flow:
        raise InvalidParameterError(f"task {task.task.value} has no optical-flow results")
    rgb = _check_rgb(rest_rgb, "rest_rgb")
    pts = _check_points(rest_points, "rest_points")
    polys = {Side.LEFT: fl.region_polygons("left"), Side.RIGHT: fl.region_polygons("right")}
    vmax = max(max(r.left, r.right) for r in task.flow)
    norm = Normalize(0.0, vmax if vmax > 0 else 1.0)
    from matplotlib import colormaps

    cmap = colormaps["inferno"]

    fig = _figure(FLOW_OVERLAY_SIZE)
    fig.text(0.5, 0.985, f"FaceSym optical-flow symmetry: {TASK_TITLE[task.task]}", ha="center", va="top",
             fontsize=15, fontweight="bold")
    ax = fig.add_axes((0.02, 0.175, 0.86, 0.765))
    box = _crop_box(pts, rgb.shape)
    _show_face(ax, rgb, box)
    for region in task.flow:
        centres = {}
        for side in (Side.LEFT, Side.RIGHT):
            poly = pts[list(polys[side][region.region])]
            vs = region.left if side is Side.LEFT else region.right
            ax.add_patch(Polygon(poly, closed=True, facecolor=cmap(norm(vs)), alpha=0.55,
                                 edgecolor=_hex(side), linewidth=1.5, zorder=2))
            c = poly.mean(axis=0)
            centres[side] = c
            ax.text(c[0], c[1], f"VS {vs:.2f}", color="white", fontsize=10, ha="center", va="center",
                    zorder=5, path_effects=_outlined("black", 2.5))
        mid = (centres[Side.LEFT] + centres[Side.RIGHT]) / 2
        ax.text(mid[0], mid[1], f"{region.region}\nSS {region.symmetry_score:.2f}", fontsize=10,
                ha="center", va="center", zorder=6,
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.3"})
    _side_labels(ax, pts, box)
    cax = fig.add_axes((0.9, 0.3, 0.025, 0.5))
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, label="VS (D/100 per frame)")
    lines = [
        "SS per region: " + ", ".join(f"{r.region} {r.symmetry_score:.2f}" for r in task.flow)
        + "  (1 = symmetric)",
        "VS per side: " + ", ".join(f"{r.region} L {r.left:.2f} / R {r.right:.2f}" for r in task.flow),
        f"frames {task.rest_frames[0]}–{task.frames[1]}; regions drawn on a rest frame",
        _orientation_note(pts),
    ]
    _caption(fig, lines, 0.16)
    return _rgb(fig)
