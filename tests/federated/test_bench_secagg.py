"""`silotune bench secagg --quick`: the issue's JSON schema and the byte and error targets."""

from __future__ import annotations

import io

from rich.console import Console

from silotune.bench import secagg


def test_quick_secagg_benchmark_schema_and_targets() -> None:
    console = Console(file=io.StringIO(), width=120)
    result = secagg.run(quick=True, console=console)
    assert set(result) == {"bench", "params", "silos", "results", "authentication"}
    assert result["bench"] == "secagg" and result["silos"] == 4
    assert result["params"] == secagg.QUICK_PARAMS
    methods = result["results"]
    assert list(methods) == ["plain", "masking", "he", "fedshield_baseline"]
    keys = {"encode_s", "bytes_per_param", "aggregate_s", "decode_s", "max_abs_err"}
    assert all(set(m) == keys for m in methods.values())
    assert methods["plain"]["bytes_per_param"] == 4.0
    assert methods["masking"]["bytes_per_param"] < 4.001  # uint32 plus a 30-byte header
    assert methods["he"]["bytes_per_param"] <= 8.0
    assert methods["fedshield_baseline"]["bytes_per_param"] > 80
    for name in ("masking", "he"):
        assert methods[name]["max_abs_err"] <= 1e-4
    assert "bench secagg" in console.file.getvalue()
    auth = result["authentication"]
    # Signatures and the consistency round cost something, measured against the bare protocol.
    assert auth["authenticated_round_s"] > 0 and auth["bare_round_s"] > 0
    assert auth["auth_bytes_sent_per_silo"] > auth["bare_bytes_sent_per_silo"] > 0
    assert auth["auth_bytes_received_per_silo"] > auth["bare_bytes_received_per_silo"] > 0
