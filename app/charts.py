"""The model page's charts, drawn from the bundle's held-out predictions as inline SVG.

Pure functions and plain Python math (no numpy, no plotting library: this runs in the web
process): held-out rows (``{"true": 0|1, "probability": p, ...}``) -> figures (ROC curve and
AUC, confusion matrix at the threshold, calibration bins, score histogram by true class) ->
SVG strings. Each SVG carries ``role="img"``, a ``<title>`` and a ``<desc>`` with the key
numbers; the page adds a figcaption and a visually hidden data table.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

NEG_COLOUR, POS_COLOUR, MODEL_COLOUR, MARK_COLOUR = "#3b6fb6", "#e8871e", "#1d2330", "#b42318"
W, H = 480, 340  # every chart's viewBox
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 40, 46  # plot-area margins (TOP leaves room for the legend)
X0, X1, Y0, Y1 = LEFT, W - RIGHT, TOP, H - BOTTOM  # plot area: x0..x1 left-right, y0 top, y1 bottom


# ---------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Roc:
    points: tuple[tuple[float, float], ...]  # (false positive rate, true positive rate), (0,0)..(1,1)
    auc: float
    operating: tuple[float, float]  # (fpr, tpr) at the threshold
    positives: int
    negatives: int


@dataclass(frozen=True)
class Confusion:
    threshold: float
    tn: int
    fp: int
    fn: int
    tp: int

    @property
    def total(self) -> int:
        return self.tn + self.fp + self.fn + self.tp

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.total


@dataclass(frozen=True)
class CalibrationBin:
    lo: float
    hi: float
    count: int
    mean_predicted: float | None  # None when the bin is empty
    observed: float | None  # fraction of true 1s in the bin


@dataclass(frozen=True)
class Histogram:
    edges: tuple[float, ...]  # bins+1 edges over [0, 1]; bin i is [edges[i], edges[i+1]), the last closed
    negatives: tuple[int, ...]  # rows with true label 0, per bin
    positives: tuple[int, ...]


def _scores(rows: Iterable[Mapping[str, Any]]) -> list[tuple[float, int]]:
    return [(float(r["probability"]), int(r["true"])) for r in rows]


def _edges(bins: int) -> tuple[float, ...]:
    return tuple(i / bins for i in range(bins + 1))


def _bin(edges: Sequence[float], p: float) -> int:
    return min(max(bisect_right(edges, p) - 1, 0), len(edges) - 2)


def roc(rows: Iterable[Mapping[str, Any]], threshold: float = 0.5) -> Roc:
    """ROC curve (tied scores move together, one diagonal step) and its trapezoidal AUC."""
    scored = sorted(_scores(rows), key=lambda s: -s[0])
    pos = sum(t for _, t in scored)
    neg = len(scored) - pos
    if not pos or not neg:
        raise ValueError("ROC needs both classes in the held-out rows")
    points, tp, fp, auc, i = [(0.0, 0.0)], 0, 0, 0.0, 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            tp, fp, j = tp + scored[j][1], fp + 1 - scored[j][1], j + 1
        x, y = fp / neg, tp / pos
        auc += (x - points[-1][0]) * (y + points[-1][1]) / 2
        points.append((x, y))
        i = j
    op_tp = sum(1 for p, t in scored if t and p >= threshold)
    op_fp = sum(1 for p, t in scored if not t and p >= threshold)
    return Roc(tuple(points), auc, (op_fp / neg, op_tp / pos), pos, neg)


def confusion(rows: Iterable[Mapping[str, Any]], threshold: float) -> Confusion:
    """Counts of (true, predicted) with predicted = probability >= threshold (as the API)."""
    cells = {(t, p): 0 for t in (0, 1) for p in (0, 1)}
    for prob, true in _scores(rows):
        cells[(true, int(prob >= threshold))] += 1
    return Confusion(threshold, cells[(0, 0)], cells[(0, 1)], cells[(1, 0)], cells[(1, 1)])


def calibration(rows: Iterable[Mapping[str, Any]], bins: int = 10) -> tuple[CalibrationBin, ...]:
    """Equal-width probability bins: mean predicted probability vs observed fraction of 1s."""
    edges = _edges(bins)
    groups: list[list[tuple[float, int]]] = [[] for _ in range(bins)]
    for p, t in _scores(rows):
        groups[_bin(edges, p)].append((p, t))
    return tuple(CalibrationBin(edges[i], edges[i + 1], len(g),
                                sum(p for p, _ in g) / len(g) if g else None,
                                sum(t for _, t in g) / len(g) if g else None)
                 for i, g in enumerate(groups))


def histogram(rows: Iterable[Mapping[str, Any]], bins: int = 20) -> Histogram:
    """Counts of predicted probabilities per equal-width bin, by true class."""
    edges = _edges(bins)
    counts = {0: [0] * bins, 1: [0] * bins}
    for p, t in _scores(rows):
        counts[t][_bin(edges, p)] += 1
    return Histogram(edges, tuple(counts[0]), tuple(counts[1]))


# ---------------------------------------------------------------------------- SVG helpers
def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))


def sx(v: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """x coordinate of value v on an axis lo..hi spanning the plot area."""
    return X0 + (v - lo) / (hi - lo) * (X1 - X0)


def sy(v: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return Y1 - (v - lo) / (hi - lo) * (Y1 - Y0)


def _tick(v: float) -> str:
    return f"{v:g}"


def _nice_max(m: float) -> tuple[float, float]:
    """An axis top >= m and a tick step giving at most 6 ticks."""
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if m / step <= 6:
            return max(step, math.ceil(m / step) * step), step
    step = 10 ** math.ceil(math.log10(m / 6))
    return math.ceil(m / step) * step, step


def _axes(xlabel: str, ylabel: str, yhi: float = 1.0, ystep: float = 0.2, xstep: float = 0.2) -> list[str]:
    out = ['<g class="grid" stroke="#e6e9ee" stroke-width="1">']
    n = round(yhi / ystep)
    for k in range(n + 1):
        y = sy(k * ystep, 0, yhi)
        out.append(f'<line x1="{X0}" y1="{_f(y)}" x2="{X1}" y2="{_f(y)}"/>')
    out.append("</g>")
    out.append(f'<line class="x-axis" x1="{X0}" y1="{Y1}" x2="{X1}" y2="{Y1}" stroke="#555"/>')
    out.append(f'<line class="y-axis" x1="{X0}" y1="{Y0}" x2="{X0}" y2="{Y1}" stroke="#555"/>')
    out.append('<g font-size="11" fill="#444">')
    for k in range(round(1 / xstep) + 1):
        x = sx(k * xstep)
        out.append(f'<line x1="{_f(x)}" y1="{Y1}" x2="{_f(x)}" y2="{Y1 + 4}" stroke="#555"/>'
                   f'<text x="{_f(x)}" y="{Y1 + 16}" text-anchor="middle">'
                   f'{_tick(round(k * xstep, 6))}</text>')
    for k in range(n + 1):
        y = sy(k * ystep, 0, yhi)
        out.append(f'<text x="{X0 - 6}" y="{_f(y + 4)}" text-anchor="end">'
                   f'{_tick(round(k * ystep, 6))}</text>')
    out.append("</g>")
    out.append(f'<text x="{_f((X0 + X1) / 2)}" y="{H - 8}" text-anchor="middle" font-size="12" '
               f'fill="#1d2330">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(15 {_f((Y0 + Y1) / 2)}) rotate(-90)" text-anchor="middle" '
               f'font-size="12" fill="#1d2330">{escape(ylabel)}</text>')
    return out


def _legend(items: Sequence[tuple[str, str]]) -> str:
    """One row of legend entries above the plot: (swatch svg at 0,0 .. 18,0, label)."""
    out, x = ['<g class="legend" font-size="11.5" fill="#1d2330">'], float(X0)
    for swatch, label in items:
        out.append(f'<g transform="translate({_f(x)} 16)">{swatch}'
                   f'<text x="24" y="4">{escape(label)}</text></g>')
        x += 24 + 6.4 * len(label) + 16
    out.append("</g>")
    return "".join(out)


def _line_swatch(colour: str, dash: str = "", width: float = 2.5) -> str:
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<line x1="0" y1="0" x2="18" y2="0" stroke="{colour}" stroke-width="{width}"{d}/>'


def _box_swatch(colour: str) -> str:
    return f'<rect x="2" y="-6" width="14" height="12" fill="{colour}"/>'


def _dot_swatch(colour: str) -> str:
    return f'<circle cx="9" cy="0" r="4.5" fill="{colour}" stroke="#fff"/>'


def _svg(ident: str, title: str, desc: str, body: Iterable[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" id="{ident}" class="chart" viewBox="0 0 {W} {H}" '
            f'width="{W}" height="{H}" role="img" aria-labelledby="{ident}-title {ident}-desc" '
            f'font-family="system-ui, sans-serif">'
            f'<title id="{ident}-title">{escape(title)}</title><desc id="{ident}-desc">{escape(desc)}</desc>'
            + "".join(body) + "</svg>")


# ---------------------------------------------------------------------------- charts
def roc_svg(fig: Roc, ident: str = "roc") -> str:
    path = " ".join(f"{'M' if i == 0 else 'L'}{_f(sx(x))},{_f(sy(y))}" for i, (x, y) in enumerate(fig.points))
    ox, oy = fig.operating
    body = _axes("false positive rate (1 − specificity)", "true positive rate (recall)")
    body += [f'<line x1="{X0}" y1="{Y1}" x2="{X1}" y2="{Y0}" stroke="#999" stroke-dasharray="5 4"/>',
             f'<path class="curve" d="{path}" fill="none" stroke="{MODEL_COLOUR}" stroke-width="2.5"/>',
             f'<circle class="operating" cx="{_f(sx(ox))}" cy="{_f(sy(oy))}" r="5.5" fill="{MARK_COLOUR}" '
             'stroke="#fff" stroke-width="1.5"/>',
             _legend([(_line_swatch(MODEL_COLOUR), f"model, AUC {fig.auc:.3f}"),
                      (_line_swatch("#999", "5 4", 1.5), "chance"),
                      (_dot_swatch(MARK_COLOUR), "at the threshold")])]
    desc = (f"ROC curve over {fig.positives} positive and {fig.negatives} negative held-out rows. "
            f"Area under the curve {fig.auc:.3f} (0.5 is chance). At the threshold the false "
            f"positive rate is {ox:.3f} and the true positive rate {oy:.3f}.")
    return _svg(ident, f"ROC curve, AUC {fig.auc:.3f}", desc, body)


def confusion_svg(cm: Confusion, ident: str = "confusion") -> str:
    cx0, cy0, size = 170, 52, 124  # 2x2 cells of size x size from (cx0, cy0)
    cells = [(0, 0, cm.tn, "true negatives"), (0, 1, cm.fp, "false positives"),
             (1, 0, cm.fn, "false negatives"), (1, 1, cm.tp, "true positives")]
    body = ['<g font-size="12" fill="#1d2330">',
            f'<text x="{cx0 + size}" y="22" text-anchor="middle" font-weight="600">predicted label</text>',
            f'<text transform="translate(28 {cy0 + size}) rotate(-90)" text-anchor="middle" '
            'font-weight="600">true label</text>']
    for k, name in enumerate(("0 (No)", "1 (Yes)")):
        mid = size * k + size / 2
        body.append(f'<text x="{cx0 + mid}" y="{cy0 - 10}" text-anchor="middle">{name}</text>')
        body.append(f'<text x="{cx0 - 10}" y="{cy0 + mid + 4}" text-anchor="end">{name}</text>')
    body.append("</g>")
    for t, p, n, name in cells:
        row_total = (cm.tn + cm.fp) if t == 0 else (cm.fn + cm.tp)
        share = n / cm.total
        good = t == p
        alpha = min(1.0, 0.12 + 0.8 * share / 0.6)
        fill = f"rgba(59,111,182,{alpha:.3f})" if good else f"rgba(232,135,30,{alpha:.3f})"
        x, y = cx0 + size * p, cy0 + size * t
        ink = "#fff" if share > 0.3 else "#1d2330"
        body.append(f'<g class="cell" data-true="{t}" data-predicted="{p}" data-count="{n}">'
                    f'<rect x="{x}" y="{y}" width="{size}" height="{size}" fill="{fill}" stroke="#fff" '
                    f'stroke-width="2"/>'
                    f'<text x="{x + size / 2}" y="{y + size / 2 - 2}" text-anchor="middle" font-size="30" '
                    f'font-weight="700" fill="{ink}">{n}</text>'
                    f'<text x="{x + size / 2}" y="{y + size / 2 + 20}" text-anchor="middle" font-size="11.5" '
                    f'fill="{ink}">{name}</text>'
                    f'<text x="{x + size / 2}" y="{y + size / 2 + 36}" text-anchor="middle" font-size="11" '
                    f'fill="{ink}">{n / row_total:.0%} of true {t}</text></g>')
    body.append(f'<text x="{cx0 + size}" y="{cy0 + 2 * size + 24}" text-anchor="middle" font-size="12" '
                f'fill="#1d2330">threshold {cm.threshold:g} · accuracy {cm.accuracy:.3f} · '
                f'{cm.total} held-out rows</text>')
    desc = (f"Confusion matrix at threshold {cm.threshold:g} over {cm.total} held-out rows: "
            f"{cm.tn} true negatives, {cm.fp} false positives, {cm.fn} false negatives, "
            f"{cm.tp} true positives; accuracy {cm.accuracy:.3f}.")
    return _svg(ident, f"Confusion matrix at threshold {cm.threshold:g}", desc, body)


def calibration_svg(bins: Sequence[CalibrationBin], ident: str = "calibration") -> str:
    full = [b for b in bins if b.count]
    biggest = max(b.count for b in full)
    path = " ".join(f"{'M' if i == 0 else 'L'}{_f(sx(b.mean_predicted))},{_f(sy(b.observed))}"
                    for i, b in enumerate(full))
    body = _axes("mean predicted probability (per bin)", "observed fraction with diabetes")
    body += [f'<line x1="{X0}" y1="{Y1}" x2="{X1}" y2="{Y0}" stroke="#999" stroke-dasharray="5 4"/>',
             f'<path d="{path}" fill="none" stroke="{MODEL_COLOUR}" stroke-width="2"/>']
    for b in full:
        r = 3 + 6 * math.sqrt(b.count / biggest)
        body.append(f'<circle class="bin" cx="{_f(sx(b.mean_predicted))}" cy="{_f(sy(b.observed))}" '
                    f'r="{_f(r)}" fill="{MODEL_COLOUR}" fill-opacity="0.8" stroke="#fff" '
                    f'data-count="{b.count}"/>')
    body.append(_legend([(_line_swatch(MODEL_COLOUR, width=2), "model (dot area ∝ rows)"),
                         (_line_swatch("#999", "5 4", 1.5), "perfectly calibrated")]))
    worst = max(full, key=lambda b: abs(b.observed - b.mean_predicted))
    desc = (f"Reliability diagram with {len(bins)} equal-width bins ({len(full)} non-empty). "
            "Points on the diagonal are perfectly calibrated. Largest gap: bin "
            f"{worst.lo:g}–{worst.hi:g} ({worst.count} rows) predicts {worst.mean_predicted:.2f}, "
            f"observed {worst.observed:.2f}.")
    return _svg(ident, "Calibration (reliability) plot", desc, body)


def distribution_svg(hist: Histogram, threshold: float, marker: float | None = None,
                     ident: str = "distribution") -> str:
    """Histogram of predicted probability by true class; a dashed line at the threshold and,
    with `marker`, a line at that probability (one patient's score)."""
    counts = sorted(hist.negatives + hist.positives, reverse=True)
    top = counts[0]
    # one bin far above the rest (most true 0s score near 0) would flatten every other bar:
    # cap the axis and mark the clipped bar with its count
    cap = counts[1] * 1.25 if top > 2.5 * counts[1] else top
    yhi, ystep = _nice_max(cap)
    bins = len(hist.edges) - 1
    width = (X1 - X0) / bins
    body = _axes("predicted probability of diabetes", "held-out rows", yhi, ystep)
    for i in range(bins):
        for k, (n, colour) in enumerate(((hist.negatives[i], NEG_COLOUR), (hist.positives[i], POS_COLOUR))):
            if not n:
                continue
            x = X0 + i * width + 1 + k * (width - 2) / 2
            h = Y1 - sy(min(n, yhi), 0, yhi)
            body.append(f'<rect class="bar" data-class="{k}" data-bin="{i}" data-count="{n}" x="{_f(x)}" '
                        f'y="{_f(Y1 - h)}" width="{_f((width - 2) / 2)}" height="{_f(h)}" fill="{colour}"/>')
            if n > yhi:
                step = _f(width / 2 + 4)
                body.append(f'<path d="M{_f(x - 2)},{Y0 + 10} l{step},-5 m0,9 l-{step},5" '
                            f'stroke="#fff" stroke-width="3"/>'
                            f'<text x="{_f(x + width)}" y="{Y0 + 12}" font-size="11" '
                            f'fill="#1d2330">{n} ↑</text>')
    tx = sx(threshold)
    body.append(f'<line class="threshold" x1="{_f(tx)}" y1="{Y0}" x2="{_f(tx)}" y2="{Y1}" stroke="#555" '
                'stroke-dasharray="4 3" stroke-width="1.5"/>')
    legend = [(_box_swatch(NEG_COLOUR), f"true 0 (No), n={sum(hist.negatives)}"),
              (_box_swatch(POS_COLOUR), f"true 1 (Yes), n={sum(hist.positives)}"),
              (_line_swatch("#555", "4 3", 1.5), f"threshold {threshold:g}")]
    desc = (f"Histogram of the predicted probability of the {sum(hist.negatives)} held-out rows "
            f"with true label 0 and the {sum(hist.positives)} with true label 1, in {bins} bins of "
            f"width {1 / bins:g}; {sum(hist.negatives[:bins // 2])} of the true 0s score below "
            f"{hist.edges[bins // 2]:g} and {sum(hist.positives[bins // 2:])} of the true 1s at or above it.")
    title = "Score distribution by true class"
    if marker is not None:
        mx = sx(min(max(marker, 0.0), 1.0))
        anchor, dx = ("end", -5) if marker > 0.75 else ("start", 5)
        body.append(f'<g class="marker" id="{ident}-marker" data-probability="{marker:.6f}">'
                    f'<line x1="{_f(mx)}" y1="{Y0 - 2}" x2="{_f(mx)}" y2="{Y1}" stroke="{MARK_COLOUR}" '
                    f'stroke-width="3"/>'
                    f'<text x="{_f(mx + dx)}" y="{Y0 + 28}" text-anchor="{anchor}" font-size="12" '
                    f'font-weight="700" fill="{MARK_COLOUR}">this patient {marker:.3f}</text></g>')
        title += f", with this patient's score {marker:.3f}"
        desc += f" This patient's predicted probability {marker:.3f} is marked with a red line."
    body.append(_legend(legend))
    return _svg(ident, title, desc, body)


# ---------------------------------------------------------------------------- all of it
@dataclass(frozen=True)
class Charts:
    """Every figure of the page and its SVG (the distribution without a patient marker)."""

    threshold: float
    roc: Roc
    confusion: Confusion
    calibration: tuple[CalibrationBin, ...]
    histogram: Histogram
    svg: Mapping[str, str]

    def distribution(self, marker: float | None = None) -> str:
        return self.svg["distribution"] if marker is None else \
            distribution_svg(self.histogram, self.threshold, marker)


def build(rows: Sequence[Mapping[str, Any]], threshold: float) -> Charts:
    """Figures and SVGs for held-out rows (compute once per process: the web caches it)."""
    r, cm = roc(rows, threshold), confusion(rows, threshold)
    cal, hist = calibration(rows), histogram(rows)
    svg = {"roc": roc_svg(r), "confusion": confusion_svg(cm), "calibration": calibration_svg(cal),
           "distribution": distribution_svg(hist, threshold)}
    return Charts(threshold, r, cm, cal, hist, svg)
