"""bench/serve_variants.py's variant syntax (pure): settings reach the app or the broker only."""

import pytest

from bench.serve_variants import ERL_KEY, parse_variant


def test_variant_settings_are_parsed():
    assert parse_variant("deployed:") == ("deployed", {})
    assert parse_variant("web2x2:MODELSERVE_WEB_PROCESSES=2,MODELSERVE_DISPATCH_THREADS=4") == (
        "web2x2", {"MODELSERVE_WEB_PROCESSES": "2", "MODELSERVE_DISPATCH_THREADS": "4"})
    assert parse_variant(f"sbwt:{ERL_KEY}=+sbwt none +sbwtdcpu none") == (
        "sbwt", {ERL_KEY: "+sbwt none +sbwtdcpu none"})


@pytest.mark.parametrize("text", ["", ":MODELSERVE_WEB_PROCESSES=2", "a b:", "x:PATH=/tmp",
                                  "x:MODELSERVE_WEB_PROCESSES"])
def test_bad_variants_are_refused_with_one_line(text):
    with pytest.raises(SystemExit, match="--variant"):
        parse_variant(text)
