"""The peer benchmark's pure parts: medians, ratios to the best peer, table, result shape."""

from bench.peers import report


def sample(rps, p50=1.0):
    return {"rps": rps, "p50_ms": p50, "p99_ms": p50 * 2, "requests": 1, "failed": 0}


def runs():
    r = {}
    for name, (c1, c16, c64, bulk) in {"modelserve": (100, 400, 600, 60_000),
                                        "fastapi-1": (400, 450, 430, 30_000),
                                        "fastapi-2": (390, 700, 700, 31_000)}.items():
        r[(name, "c1")] = [sample(c1 * f, 10 / c1 * 100 / f) for f in (1.1, 0.9, 1.0)]
        r[(name, "c16")] = [sample(c16)]
        r[(name, "c64")] = [sample(c64), sample(c64 * 2), sample(c64 / 2)]
        r[(name, "bulk")] = [{"rows": 10_000, "seconds_median": 10_000 / bulk, "rows_per_s": bulk}]
    return r


def test_median_keeps_the_middle_round_and_lists_all():
    m = report.median([sample(3), sample(1), sample(2)], "rps")
    assert m["rps"] == 2 and m["all_rps"] == [3, 1, 2]


def test_ratios_are_against_the_best_peer_at_each_level():
    out = report.result(report.summarize(runs()), {"rounds": 3})
    assert out["best_peer_c1"] == "fastapi-1" and out["best_peer_c64"] == "fastapi-2"
    assert out["broker_over_best_peer_c1"] == 0.25
    assert out["broker_over_best_peer_c16"] == round(400 / 700, 3)
    assert out["broker_over_best_peer_c64"] == round(600 / 700, 3)
    # p50 of the median round: modelserve 10 ms, fastapi-1 2.5 ms
    assert out["p50_c1_over_best_peer"] == 4.0
    assert out["bulk_over_best_peer"] == round(60_000 / 31_000, 3)
    assert out["rounds"] == 3 and set(out["servers"]) == {"modelserve", "fastapi-1", "fastapi-2"}


def test_no_peers_no_ratios():
    servers = report.summarize({k: v for k, v in runs().items() if k[0] == "modelserve"})
    assert not any(k.startswith("broker_over") for k in report.ratios(servers))


def test_table_has_a_line_per_server_and_the_ratios():
    text = report.table(report.result(report.summarize(runs()), {}))
    lines = text.splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == ["modelserve", "fastapi-1", "fastapi-2"]
    assert "(0.25x)" in lines[1] and "broker_over_best_peer_c64 0.86" in lines[-1]
