"""The model page's charts (app/charts.py): figures checked against direct computations on the
bundle's real held-out rows, SVG well-formed with a text alternative, the patient marker where
the score is; and the page route that shows them (stand-in client; the browser test is in
tests/integration/test_browser.py)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from app import charts
from app.config import load_config
from app.web import create_app

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def rows(bundle):
    return bundle.metadata["holdout_sample"]


@pytest.fixture(scope="module")
def built(bundle, rows):
    return charts.build(rows, bundle.threshold)


def _pairs_auc(rows) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    pos = [r["probability"] for r in rows if r["true"] == 1]
    neg = [r["probability"] for r in rows if r["true"] == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_equals_the_pairwise_probability_on_the_holdout(rows, bundle, built):
    assert built.roc.auc == pytest.approx(_pairs_auc(rows), abs=1e-12)
    assert round(built.roc.auc, 4) == bundle.metadata["metrics"]["roc_auc"]
    assert (built.roc.positives, built.roc.negatives) == (109, 223)


def test_roc_curve_runs_from_origin_to_one_monotonically(built):
    pts = built.roc.points
    assert pts[0] == (0.0, 0.0) and pts[-1] == pytest.approx((1.0, 1.0))
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(pts, pts[1:], strict=False))


@pytest.mark.parametrize("scored, auc", [
    ([(0.9, 1), (0.1, 0)], 1.0),
    ([(0.1, 1), (0.9, 0)], 0.0),
    ([(0.5, 1), (0.5, 0)], 0.5),  # a tie is one diagonal step: half a pair
    ([(0.8, 1), (0.5, 1), (0.5, 0), (0.2, 0), (0.5, 0)], _pairs_auc(
        [{"probability": p, "true": t} for p, t in [(0.8, 1), (0.5, 1), (0.5, 0), (0.2, 0), (0.5, 0)]])),
])
def test_auc_handles_ties_like_the_pairwise_definition(scored, auc):
    rows = [{"probability": p, "true": t} for p, t in scored]
    assert charts.roc(rows).auc == pytest.approx(auc)


def test_roc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        charts.roc([{"probability": 0.3, "true": 1}])


def test_confusion_matrix_matches_the_threshold_and_the_bundle(rows, bundle, built):
    cm = built.confusion
    assert cm.total == 332 == len(rows)
    direct = {(t, p): sum(1 for r in rows
                          if r["true"] == t and int(r["probability"] >= bundle.threshold) == p)
              for t in (0, 1) for p in (0, 1)}
    assert (cm.tn, cm.fp, cm.fn, cm.tp) == (direct[0, 0], direct[0, 1], direct[1, 0], direct[1, 1])
    # the bundle's own predicted labels and metrics agree
    assert sum(1 for r in rows if r["true"] == 1 and r["predicted"] == 1) == cm.tp
    assert sum(1 for r in rows if r["true"] == 0 and r["predicted"] == 1) == cm.fp
    m = bundle.metadata["metrics"]
    assert round(cm.accuracy, 4) == m["accuracy"]
    assert round(cm.tp / (cm.tp + cm.fp), 4) == m["precision"]
    assert round(cm.tp / (cm.tp + cm.fn), 4) == m["recall"]
    # the ROC's operating point is this matrix
    assert built.roc.operating == (cm.fp / (cm.fp + cm.tn), cm.tp / (cm.tp + cm.fn))


def test_confusion_moves_with_the_threshold_and_a_tie_counts_as_positive(rows):
    strict = charts.confusion(rows, 0.9)
    assert strict.tp + strict.fp == sum(1 for r in rows if r["probability"] >= 0.9)
    assert strict.tp + strict.fp < charts.confusion(rows, 0.5).tp + charts.confusion(rows, 0.5).fp
    at = charts.confusion([{"probability": 0.5, "true": 0}], 0.5)
    assert (at.fp, at.tn) == (1, 0)  # as the API: label = probability >= threshold


def test_calibration_bins_against_a_direct_computation(rows, built):
    bins = built.calibration
    assert len(bins) == 10 and sum(b.count for b in bins) == 332
    for i, b in enumerate(bins):
        assert (b.lo, b.hi) == pytest.approx((i / 10, (i + 1) / 10))
        inside = [r for r in rows if b.lo <= r["probability"] < b.hi or (i == 9 and r["probability"] == 1.0)]
        assert b.count == len(inside)
        if inside:
            assert b.mean_predicted == pytest.approx(sum(r["probability"] for r in inside) / len(inside))
            assert b.observed == pytest.approx(sum(r["true"] for r in inside) / len(inside))
        else:
            assert b.mean_predicted is b.observed is None


def test_calibration_bin_edges():
    rows = [{"probability": p, "true": 1} for p in (0.0, 0.1, 0.0999, 1.0)]
    counts = [b.count for b in charts.calibration(rows)]
    assert counts == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # 0.1 opens bin 1; 1.0 closes the last bin


def test_histogram_counts_by_class(rows, built):
    h = built.histogram
    assert len(h.edges) == 21 and h.edges[0] == 0 and h.edges[-1] == 1
    assert (sum(h.negatives), sum(h.positives)) == (223, 109)
    for i in range(20):
        lo, hi = h.edges[i], h.edges[i + 1]
        for label, counts in ((0, h.negatives), (1, h.positives)):
            assert counts[i] == sum(1 for r in rows if r["true"] == label
                                    and (lo <= r["probability"] < hi or (i == 19 and r["probability"] == 1)))


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed XML or this raises
    assert root.tag == SVG + "svg" and root.get("role") == "img"
    ids = {el.get("id"): el for el in root.iter() if el.get("id")}
    title_id, desc_id = root.get("aria-labelledby").split()
    assert ids[title_id].tag == SVG + "title" and ids[title_id].text.strip()
    assert ids[desc_id].tag == SVG + "desc" and len(ids[desc_id].text) > 60
    return root


def test_every_svg_is_well_formed_with_a_text_alternative(built):
    assert set(built.svg) == {"roc", "confusion", "calibration", "distribution"}
    roots = {name: _parse(svg) for name, svg in built.svg.items()}
    assert f"AUC {built.roc.auc:.3f}" in roots["roc"].find(SVG + "title").text
    cm = built.confusion
    desc = roots["confusion"].find(SVG + "desc").text
    assert f"{cm.tn} true negatives, {cm.fp} false positives, {cm.fn} false negatives, {cm.tp} true" in desc
    cells = {(c.get("data-true"), c.get("data-predicted")): int(c.get("data-count"))
             for c in roots["confusion"].iter(SVG + "g") if c.get("class") == "cell"}
    assert cells == {("0", "0"): cm.tn, ("0", "1"): cm.fp, ("1", "0"): cm.fn, ("1", "1"): cm.tp}
    bars = [b for b in roots["distribution"].iter(SVG + "rect") if b.get("class") == "bar"]
    assert sum(int(b.get("data-count")) for b in bars) == 332
    assert roots["distribution"].find(f".//{SVG}g[@class='marker']") is None


def _axis_span(root: ET.Element) -> tuple[float, float]:
    axis = next(el for el in root.iter(SVG + "line") if el.get("class") == "x-axis")
    return float(axis.get("x1")), float(axis.get("x2"))


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.731, 0.97, 1.0])
def test_marker_sits_at_the_patients_probability(built, p):
    root = _parse(built.distribution(p))
    marker = root.find(f".//{SVG}g[@class='marker']")
    assert marker is not None and float(marker.get("data-probability")) == pytest.approx(p)
    line, label = marker.find(SVG + "line"), marker.find(SVG + "text")
    x0, x1 = _axis_span(root)
    assert line.get("x1") == line.get("x2")
    assert (float(line.get("x1")) - x0) / (x1 - x0) == pytest.approx(p, abs=0.001)
    assert f"{p:.3f}" in label.text and f"{p:.3f}" in root.find(SVG + "title").text
    # the label stays inside the chart: anchored at its end near the right edge
    assert label.get("text-anchor") == ("end" if p > 0.75 else "start")


def test_threshold_line_and_cached_distribution(built, bundle):
    root = _parse(built.svg["distribution"])
    x0, x1 = _axis_span(root)
    line = next(el for el in root.iter(SVG + "line") if el.get("class") == "threshold")
    assert (float(line.get("x1")) - x0) / (x1 - x0) == pytest.approx(bundle.threshold, abs=0.001)
    assert built.distribution(None) is built.svg["distribution"]


def test_charts_import_no_numeric_or_plotting_library():
    code = ("import sys, app.charts; bad = [m for m in ('numpy', 'matplotlib', 'tensorflow', 'pandas') "
            "if m in sys.modules]; assert not bad, bad; import app.web; "
            "bad = [m for m in ('matplotlib', 'tensorflow', 'keras', 'pandas') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- the page route
CFG = {"MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/modelserve",
       "MODELSERVE_RESULT_URL": "redis://:p@127.0.0.1:1/0",
       "MODELSERVE_INSTANCE_ENV": "/nonexistent", "MODELSERVE_RELEASE": "r7"}
ROW = {"npreg": "1", "glu": "89", "bp": "66", "skin": "23", "bmi": "28.1", "ped": "0.167", "age": "21"}


class Stub:
    def __init__(self, sha):
        self.sha = sha

    def predict(self, rows):
        return [0.625] * len(rows), self.sha


@pytest.fixture
def page_client(bundle):
    app = create_app(load_config(CFG), bundle, client=Stub(bundle.sha256))
    c = app.test_client()
    c.state = app.extensions["modelserve"]
    return c


def _svgs(html: str) -> list[ET.Element]:
    out, start = [], 0
    while (start := html.find("<svg", start)) >= 0:
        end = html.index("</svg>", start) + len("</svg>")
        out.append(_parse(html[start:end]))
        start = end
    return out


def test_page_shows_four_charts_computed_once(page_client):
    html = page_client.get("/").get_data(as_text=True)
    assert [s.get("id") for s in _svgs(html)] == ["distribution", "roc", "confusion", "calibration"]
    cached = page_client.state["charts"]
    page_client.get("/")
    assert page_client.state["charts"] is cached
    assert "<figcaption>" in html and 'class="sr-only"' in html


def test_form_result_marks_the_score_on_the_distribution(page_client):
    r = page_client.post("/", data=ROW)
    html = r.get_data(as_text=True)
    assert r.status_code == 200
    assert 'id="result"' in html and "probability of diabetes <b>0.625</b> → label <b>1</b>" in html
    dist = _svgs(html)[0]
    marker = dist.find(f".//{SVG}g[@class='marker']")
    assert float(marker.get("data-probability")) == 0.625


def test_out_of_range_value_names_the_field(page_client):
    r = page_client.post("/", data={**ROW, "glu": "400"})
    html = r.get_data(as_text=True)
    assert r.status_code == 400 and 'id="result"' not in html
    assert "glu: glu=400.0 is outside [0, 300]" in html and "valid range 0–300" in html
    assert 'id="glu" name="glu" inputmode="decimal" required value="400" aria-invalid="true"' in html
    assert "instances[0]" not in html
    assert _svgs(html)[0].find(f".//{SVG}g[@class='marker']") is None
