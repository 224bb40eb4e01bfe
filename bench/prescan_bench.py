"""app.limits.prescan on worst-case bodies up to the 1 MiB body limit (issue 24).

    python bench/prescan_bench.py [--repeat 5] [--out bench/results/prescan.json]

For each shape and size: the best of `repeat` runs, in ms and ms per MiB. A linear prescan has
a flat ms/MiB column; the regex it replaced took 1.6 s on 16 KiB of `"` + `\\"`*k and 28 s on
64 KiB (quadratic). The same shapes are asserted in tests/unit/test_limits.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.limits import prescan  # noqa: E402

MiB = 1 << 20
SIZES = (16 << 10, 64 << 10, MiB // 8, MiB // 4, MiB // 2, MiB)


def _fill(head: bytes, unit: bytes, tail: bytes, size: int) -> bytes:
    n = max(0, (size - len(head) - len(tail)) // len(unit) + 1)
    return (head + unit * n)[:size - len(tail)] + tail


SHAPES = {
    "quote-escaped-quotes": lambda n: _fill(b'"', b'\\"', b"", n),
    "quote-backslashes": lambda n: _fill(b'"', b"\\\\", b"", n),
    "backslashes": lambda n: _fill(b"", b"\\", b"", n),
    "escape-strings": lambda n: _fill(b"[", b'"\\\\\\"\\"\\u005c",', b"1]", n),
    "deep-nesting": lambda n: _fill(b"", b"[", b"", n),
    "long-numbers": lambda n: _fill(b"[", b"1234567890", b"]", n),
    "many-keys": lambda n: _fill(b"{", b'"k":0,', b'"z":0}', n),
    "long-string": lambda n: _fill(b'["', b"a", b'"]', n),
    "many-rows": lambda n: _fill(b'{"instances":[', b"[1,2,3],", b"[1]]}", n),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/prescan.json")
    args = ap.parse_args()
    rows = []
    print(f"{'shape':<22}{'bytes':>9}{'ms':>10}{'ms/MiB':>10}")
    for shape, make in SHAPES.items():
        for size in SIZES:
            body = make(size)
            best = float("inf")
            for _ in range(args.repeat):
                t = time.perf_counter()
                prescan(body)
                best = min(best, time.perf_counter() - t)
            ms, per_mib = best * 1e3, best * 1e3 * MiB / size
            rows.append({"shape": shape, "bytes": size, "ms": round(ms, 4),
                         "ms_per_mib": round(per_mib, 4)})
            print(f"{shape:<22}{size:>9}{ms:>10.3f}{per_mib:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeat": args.repeat, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
