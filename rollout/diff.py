"""The model-diff gate: how would the new release's answers differ from the live one's?

Before the switch, ``deploy`` sends the same rows to the live front (blue) and the new front
(green), directly (their instance addresses, not the floating IP), and compares the answers:
the share of rows with the same label (agreement), the rows whose label flipped, and the mean
and max absolute change of the probability. Above ``--max-disagreement`` (the share of rows
flipped) the deploy is refused, unless ``--force`` (recorded).

The rows: the new release's held-out sample (``GET /api/v1/model/holdout`` on green; a front
without that route answers 404, then the tool's own bundle's sample is used) plus the rows of
``--diff-sample FILE`` (JSONL of recorded requests: each line a request body
``{"instances": [...]}`` or one instance object).

Pure parts (``compare``, ``parse_sample``, ``chunks``, ``Figures``) have no I/O; ``predict``,
``fetch_holdout`` and ``load_sample`` are bounded (timeouts, row limits).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from rollout import health, retry
from rollout.errors import WaitTimeout

DEFAULT_MAX_DISAGREEMENT = 0.25
#: rows per prediction request (the app accepts more; small requests keep each one quick)
CHUNK_ROWS = 256
#: the most rows a --diff-sample file may hold
MAX_SAMPLE_ROWS = 10_000
#: flipped rows kept in the figures (the rest are counted)
MAX_FLIPS_SHOWN = 10
TIMEOUT = (2.0, 15.0)  # connect, read: per request
HOLDOUT_PATH = "/api/v1/model/holdout"
PREDICT_PATH = "/api/v1/predictions"


class SampleError(ValueError):
    """A --diff-sample file is unreadable or not the JSONL it should be (usage error)."""


class PredictError(Exception):
    """A front did not answer the rows (HTTP error, timeout, malformed answer); ``status``:
    the HTTP status when it answered one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# -- the sample file (pure parsing + one bounded read) ----------------------------------------
def parse_sample(text: str, *, max_rows: int = MAX_SAMPLE_ROWS, name: str = "sample") -> list[dict]:
    """The instance rows of a JSONL text: each non-blank line is a request body
    ``{"instances": [{...}, ...]}`` or one instance object. Raises ``SampleError`` naming the
    line for bad JSON, a line that is not an object, an instance that is not an object, no
    rows at all, or more than ``max_rows`` rows."""
    rows: list[dict] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise SampleError(f"{name} line {n}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise SampleError(f"{name} line {n}: a {type(obj).__name__}, expected an object "
                              "(a request body {\"instances\": [...]} or one instance)")
        if "instances" in obj:
            items = obj["instances"]
            if not isinstance(items, list):
                raise SampleError(f"{name} line {n}: \"instances\" is not a list")
            for k, item in enumerate(items):
                if not isinstance(item, dict):
                    raise SampleError(f"{name} line {n}: instances[{k}] is a "
                                      f"{type(item).__name__}, expected an object")
            rows.extend(items)
        else:
            rows.append(obj)
        if len(rows) > max_rows:
            raise SampleError(f"{name}: more than {max_rows} rows (line {n})")
    if not rows:
        raise SampleError(f"{name}: no rows")
    return rows


def load_sample(path: str, *, max_rows: int = MAX_SAMPLE_ROWS) -> list[dict]:
    """``parse_sample`` of a file (read at most ~64 MiB: a bigger file cannot be a valid
    sample of ``max_rows`` rows anyway)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read((64 << 20) + 1)
        if len(data) > 64 << 20:
            raise SampleError(f"{path}: larger than 64 MiB")
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SampleError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise SampleError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return parse_sample(text, max_rows=max_rows, name=path)


# -- the figures (pure) -------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """One row's prediction."""

    probability: float
    label: int


@dataclass(frozen=True)
class Figures:
    """Blue vs green on the same rows."""

    rows: int
    flipped: int
    mean_abs_change: float
    max_abs_change: float
    flips: tuple[dict, ...] = ()  # the first MAX_FLIPS_SHOWN flipped rows
    sources: tuple[tuple[str, int], ...] = ()  # ("holdout", n), ("sample", m)

    @property
    def flip_rate(self) -> float:
        return self.flipped / self.rows if self.rows else 0.0

    @property
    def agreement(self) -> float:
        return 1.0 - self.flip_rate if self.rows else 1.0

    def refused(self, max_disagreement: float) -> bool:
        """The gate's rule: more than ``max_disagreement`` of the rows flipped."""
        return self.flip_rate > max_disagreement

    def to_dict(self) -> dict:
        return {"rows": self.rows, "agreement": round(self.agreement, 4),
                "flipped": self.flipped, "flip_rate": round(self.flip_rate, 4),
                "mean_abs_change": round(self.mean_abs_change, 4),
                "max_abs_change": round(self.max_abs_change, 4),
                "sources": dict(self.sources), "flips": list(self.flips)}

    def line(self) -> str:
        """The one line of figures printed by the gate."""
        return (f"{self.rows} rows ({', '.join(f'{n} {s}' for s, n in self.sources)}): "
                f"agreement {self.agreement:.2%}, {self.flipped} flipped "
                f"(flip rate {self.flip_rate:.2%}), |Δp| mean {self.mean_abs_change:.4f} "
                f"max {self.max_abs_change:.4f}")

    def detail(self) -> str:
        """Compact figures for a history event (no ';', short: a Neutron tag is 255 chars)."""
        return (f"diff flipped={self.flipped}/{self.rows} ({self.flip_rate:.2%}) "
                f"dp={self.mean_abs_change:.3f}/{self.max_abs_change:.3f}")


def compare(blue: Sequence[Answer], green: Sequence[Answer],
            sources: Sequence[str]) -> Figures:
    """The figures of two answer lists for the same rows (``sources[i]``: "holdout" or
    "sample", the origin of row i). Pure."""
    if not len(blue) == len(green) == len(sources):
        raise ValueError(f"{len(blue)} blue answers, {len(green)} green, {len(sources)} rows")
    flips: list[dict] = []
    flipped = 0
    total = biggest = 0.0
    index: dict[str, int] = {}
    for b, g, src in zip(blue, green, sources, strict=True):
        i = index.get(src, 0)
        index[src] = i + 1
        change = abs(g.probability - b.probability)
        total += change
        biggest = max(biggest, change)
        if b.label != g.label:
            flipped += 1
            if len(flips) < MAX_FLIPS_SHOWN:
                flips.append({"index": i, "source": src,
                              "blue": {"probability": b.probability, "label": b.label},
                              "green": {"probability": g.probability, "label": g.label}})
    n = len(blue)
    return Figures(n, flipped, total / n if n else 0.0, biggest, tuple(flips),
                   tuple(index.items()))


def chunks(rows: Sequence[dict], size: int = CHUNK_ROWS) -> Iterator[Sequence[dict]]:
    """``rows`` in slices of at most ``size`` (>= 1)."""
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


# -- talking to the fronts (bounded) ------------------------------------------------------------
def _answers(body: object, want: int) -> list[Answer]:
    preds = body.get("predictions") if isinstance(body, dict) else None
    if not isinstance(preds, list) or len(preds) != want:
        raise PredictError(f"answered {len(preds) if isinstance(preds, list) else 'no'} "
                           f"predictions for {want} rows")
    out = []
    for p in preds:
        try:
            prob, label = float(p["probability"]), int(p["label"])
        except (TypeError, KeyError, ValueError):
            raise PredictError(f"malformed prediction {str(p)[:80]}") from None
        if not 0.0 <= prob <= 1.0 or label not in (0, 1):
            raise PredictError(f"malformed prediction {str(p)[:80]}")
        out.append(Answer(prob, label))
    return out


def predict(address: str, port: int, rows: Sequence[dict], *, size: int = CHUNK_ROWS,
            timeout: tuple[float, float] = TIMEOUT,
            post: Callable[..., requests.Response] = requests.post,
            busy: retry.Policy = retry.DIFF_PREDICT) -> list[Answer]:
    """Every row's answer from the front at ``address`` (``POST /api/v1/predictions`` in
    chunks of at most ``size`` rows). A chunk answered 503 (busy: it says Retry-After) is
    sent again within the ``busy`` policy's budget. ``PredictError`` on any other failure
    (HTTP error, timeout, connection failure, malformed or short answer) or a front still
    busy when the budget is spent."""
    url = health.base_url(address, port) + PREDICT_PATH
    out: list[Answer] = []

    def send(part: Sequence[dict]) -> requests.Response:
        try:
            r = post(url, json={"instances": list(part)}, timeout=timeout,
                     headers={"Connection": "close"})
        except requests.RequestException as exc:
            raise PredictError(f"{type(exc).__name__} on {PREDICT_PATH}") from exc
        if r.status_code == 503:
            raise retry.FrontBusy(f"HTTP 503 on {PREDICT_PATH}: {r.text[:120].strip()}")
        if r.status_code != 200:
            raise PredictError(f"HTTP {r.status_code} on {PREDICT_PATH}: "
                               f"{r.text[:120].strip()}", r.status_code)
        return r

    for part in chunks(rows, size):
        try:
            r = busy.run(lambda part=part: send(part), what=f"POST {PREDICT_PATH}")
        except WaitTimeout as exc:
            raise PredictError(str(exc.__cause__ or exc), 503) from exc
        try:
            body = r.json()
        except ValueError:
            raise PredictError(f"{PREDICT_PATH} answered no JSON") from None
        out += _answers(body, len(part))
    return out


def fetch_holdout(address: str, port: int, *, timeout: tuple[float, float] = TIMEOUT,
                  get: Callable[..., requests.Response] = requests.get) -> list[dict] | None:
    """The front's held-out rows (``GET /api/v1/model/holdout``); None when it has no such
    route (404: a stand-in, an older image). ``PredictError`` on any other failure."""
    url = health.base_url(address, port) + HOLDOUT_PATH
    try:
        r = get(url, timeout=timeout, headers={"Connection": "close"})
    except requests.RequestException as exc:
        raise PredictError(f"{type(exc).__name__} on {HOLDOUT_PATH}") from exc
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise PredictError(f"HTTP {r.status_code} on {HOLDOUT_PATH}", r.status_code)
    try:
        rows = r.json()["rows"]
    except (ValueError, KeyError, TypeError):
        raise PredictError(f"{HOLDOUT_PATH} answered no rows") from None
    if not isinstance(rows, list) or not all(isinstance(x, dict) for x in rows):
        raise PredictError(f"{HOLDOUT_PATH} answered malformed rows")
    return rows


def bundle_holdout(path: Path | None = None) -> list[dict]:
    """The held-out rows of the tool's own bundle (``app/bundle/metadata.json``), as request
    rows; [] if it cannot be read."""
    from app.bundle import DEFAULT_BUNDLE_DIR, METADATA_FILE

    try:
        meta = json.loads((path or DEFAULT_BUNDLE_DIR / METADATA_FILE).read_text())
        names = [f["name"] for f in meta["features"]]
        return [{n: row["features"][n] for n in names}
                for row in meta.get("holdout_sample") or []]
    except (OSError, ValueError, KeyError, TypeError):
        return []


# -- the gate's measurement (both fronts) ---------------------------------------------------------
class GreenFailed(PredictError):
    """The new front did not answer the gate's rows (``sample``: on the --diff-sample rows)."""

    def __init__(self, message: str, status: int | None = None, sample: bool = False):
        super().__init__(message, status)
        self.sample = sample


@dataclass(frozen=True)
class Measured:
    """What the gate measured: the figures, or why there are none (``skipped``)."""

    figures: Figures | None
    holdout_from: str  # "green" or "the tool's bundle" (green has no holdout route)
    skipped: str = ""


def measure(green: str, blue: str | None, port: int, sample: Sequence[dict] = (), *,
            blue_name: str = "the live front") -> Measured:
    """Green's held-out rows (else the tool's bundle's) plus ``sample``, answered by green and
    by blue (addresses). ``GreenFailed`` when green does not answer; blue not answering (or
    no ``blue`` address) gives no figures and says why in ``skipped``."""
    try:
        rows = fetch_holdout(green, port)
    except PredictError as exc:
        raise GreenFailed(str(exc), exc.status) from exc
    holdout_from = "green"
    if rows is None:
        rows, holdout_from = bundle_holdout(), "the tool's bundle"
    sample = list(sample)
    if not rows and not sample:
        return Measured(None, holdout_from, "no rows to compare")
    try:
        green_ans = predict(green, port, rows)
    except PredictError as exc:
        raise GreenFailed(f"{exc} (held-out rows)", exc.status) from exc
    try:
        green_ans += predict(green, port, sample)
    except PredictError as exc:
        raise GreenFailed(f"{exc} (--diff-sample rows)", exc.status, sample=True) from exc
    if not blue:
        return Measured(None, holdout_from, f"{blue_name} has no address")
    try:  # the live front is asked once: a busy one skips the gate rather than hold it up
        blue_ans = predict(blue, port, rows + sample, busy=retry.DIFF_PREDICT.with_budget(0))
    except PredictError as exc:
        return Measured(None, holdout_from, f"{blue_name} did not answer: {exc}")
    figures = compare(blue_ans, green_ans, ["holdout"] * len(rows) + ["sample"] * len(sample))
    return Measured(figures, holdout_from)
