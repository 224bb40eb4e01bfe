"""Pure parts of the peer benchmark: medians of interleaved rounds, ratios to the best peer,
the table and the result JSON (unit-tested in tests/unit/test_peer_report.py)."""

from __future__ import annotations

SUBJECT = "modelserve"
LEVELS = ("c1", "c16", "c64")


def median(samples: list[dict], key: str) -> dict:
    """The sample with the median `key` (lower median), with every round's value attached."""
    ordered = sorted(samples, key=lambda m: m[key])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["all_" + key] = [round(m[key], 2) for m in samples]
    return out


def summarize(runs: dict[tuple[str, str], list[dict]]) -> dict[str, dict[str, dict]]:
    """{(server, level): [samples]} → {server: {level: median sample}}."""
    servers: dict[str, dict[str, dict]] = {}
    for (server, level), samples in runs.items():
        servers.setdefault(server, {})[level] = median(
            samples, "rows_per_s" if level == "bulk" else "rps")
    return servers


def best_peer(servers: dict, level: str, key: str = "rps") -> tuple[str, float] | None:
    """The peer (any server but modelserve) with the highest `key` at `level`."""
    peers = [(name, m[level][key]) for name, m in servers.items()
             if name != SUBJECT and level in m and m[level].get(key)]
    return max(peers, key=lambda p: p[1]) if peers else None


def ratios(servers: dict) -> dict:
    """The headline ratios of modelserve against the best peer at each level."""
    out: dict = {}
    me = servers.get(SUBJECT, {})
    for level in LEVELS:
        best = best_peer(servers, level)
        if best and level in me:
            out[f"best_peer_{level}"] = best[0]
            out[f"broker_over_best_peer_{level}"] = round(me[level]["rps"] / best[1], 3)
    if "c1" in me and best_peer(servers, "c1"):
        peer_p50 = servers[best_peer(servers, "c1")[0]]["c1"]["p50_ms"]
        out["p50_c1_over_best_peer"] = round(me["c1"]["p50_ms"] / peer_p50, 3)
    best = best_peer(servers, "bulk", "rows_per_s")
    if best and "bulk" in me:
        out["bulk_over_best_peer"] = round(me["bulk"]["rows_per_s"] / best[1], 3)
    return out


def result(servers: dict, meta: dict) -> dict:
    """The JSON written to bench/results/latest.json."""
    return {**meta, "servers": servers, **ratios(servers)}


def table(r: dict) -> str:
    """One line per server: rps (and ratio to the best peer) per level, p50 at c=1 and c=64,
    bulk rows/s, RSS and cold start."""
    servers = r["servers"]
    head = (f"{'server':<12} {'c=1 rps':>9} {'p50':>7} {'c=16 rps':>9} {'c=64 rps':>9} {'p50':>7} "
            f"{'bulk rows/s':>11} {'RSS MiB':>8} {'cold s':>7}")
    lines = [head]
    for name, m in servers.items():
        def rps(level, m=m, name=name):
            if level not in m:
                return f"{'-':>9}"
            best = best_peer(servers, level)
            ratio = f"{m[level]['rps'] / best[1]:.2f}x" if best and name == SUBJECT else ""
            return f"{m[level]['rps']:>9.0f}" + (f" ({ratio})" if ratio else "")
        p50 = {lv: f"{m[lv]['p50_ms']:>7.1f}" if lv in m else f"{'-':>7}" for lv in ("c1", "c64")}
        bulk = f"{m['bulk']['rows_per_s']:>11.0f}" if "bulk" in m else f"{'-':>11}"
        rss = f"{m['rss_mib']:>8.0f}" if m.get("rss_mib") is not None else f"{'-':>8}"
        cold = f"{m['cold_start_s']:>7.1f}" if m.get("cold_start_s") is not None else f"{'-':>7}"
        lines.append(f"{name:<12} {rps('c1')} {p50['c1']} {rps('c16')} {rps('c64')} {p50['c64']} "
                     f"{bulk} {rss} {cold}")
    keys = [k for k in ("broker_over_best_peer_c1", "broker_over_best_peer_c16",
                        "broker_over_best_peer_c64", "p50_c1_over_best_peer", "bulk_over_best_peer")
            if k in r]
    lines.append("  ".join(f"{k} {r[k]:.2f}" for k in keys))
    return "\n".join(lines)
