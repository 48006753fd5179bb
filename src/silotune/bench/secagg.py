"""`silotune bench secagg`: secure aggregation of one LoRA update from 4 silos, four ways.

A LoRA update of 4,194,304 parameters (Llama-2-7B, r=8 on q and v) from 4 silos with FedAvg weights
0.1, 0.2, 0.3, 0.4; values uniform in [-0.05, 0.05] from the AES-CTR PRG. Methods, same run:

* ``plain``: float32 upload, the coordinator weights and sums (no protection; the reference).
* ``masking``: pairwise-mask SecAgg (uint32 upload), share bundles sealed end to end as the
  federated rounds do; the coordinator's time covers unmasking and decoding.
* ``ckks``: silotune's HE aggregation (TenSEAL BFV, two fixed-point values per slot, N = 4096);
  the coordinator holds a public-only context; a silo decrypts.
* ``fedshield_baseline``: FedShield-LLM's CKKS (N = 8192, [60, 40, 40, 60], 2**40, one vector
  per 131,072-value tensor, one context holding the secret key, unweighted mean); its error is
  measured against the unweighted mean, which is what it computes.

``--quick`` uses 262,144 parameters (same schema). Fixed-point clip 0.25 (the job default).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import NDArray
from rich.console import Console
from rich.table import Table

from silotune.crypto import box as sealing
from silotune.crypto import ckks, masking, prg

FULL_PARAMS = 4_194_304
QUICK_PARAMS = 262_144
WEIGHTS = (0.1, 0.2, 0.3, 0.4)
CLIP = 0.25
TENSOR = 131_072  # FedShield encrypts one vector per tensor; this is one q/v LoRA factor slice


def make_updates(length: int) -> list[NDArray[np.float32]]:
    """Four silos' updates, uniform in [-0.05, 0.05], from the AES-CTR PRG (reproducible)."""
    out = []
    for k in range(len(WEIGHTS)):
        words = prg.expand(bytes([k + 1]) * 32, length, label=b"bench/secagg")
        out.append(((words.astype(np.float64) / 2**31 - 1.0) * 0.05).astype(np.float32))
    return out


def _plain(xs: list[NDArray[np.float32]], want: NDArray[np.float64]) -> dict[str, float]:
    t0 = time.perf_counter()
    uploads = [x.astype("<f4").tobytes() for x in xs]
    encode = (time.perf_counter() - t0) / len(xs)
    t0 = time.perf_counter()
    total = np.zeros(xs[0].size, dtype=np.float32)
    for w, blob in zip(WEIGHTS, uploads, strict=True):
        total += np.float32(w) * np.frombuffer(blob, dtype="<f4")
    aggregate = time.perf_counter() - t0
    return {
        "encode_s": encode,
        "bytes_per_param": len(uploads[0]) / xs[0].size,
        "aggregate_s": aggregate,
        "decode_s": 0.0,
        "max_abs_err": float(np.abs(total - want).max()),
    }


def masking_round(
    xs: list[NDArray[np.float32]],
    drop_before_upload: int | None = None,
    weights: Sequence[float] = WEIGHTS,
    clip: float = CLIP,
) -> tuple[dict[str, float], NDArray[np.float32], int]:
    """One SecAgg round over the protocol messages; returns (timings, weighted sum, upload bytes).

    Silo ``i`` (1-based) uploads ``weights[i - 1] * xs[i - 1]``; `clip` is the fixed-point range.
    """
    ids = tuple(range(1, len(xs) + 1))
    config = masking.SecAggConfig(0, ids, len(ids) // 2 + 1, xs[0].size, clip)
    server = masking.MaskingServer(config)
    clients = {i: masking.MaskingClient(i) for i in ids}
    transport = {i: sealing.new_transport_key() for i in ids}
    pks = {i: sealing.public_bytes(k) for i, k in transport.items()}
    silo_s = dict.fromkeys(ids, 0.0)

    def timed(i: int, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        silo_s[i] += time.perf_counter() - t0
        return out

    for i in ids:
        server.receive_public_key(timed(i, clients[i].setup, config.to_bytes()))
    broadcast = server.key_broadcast()

    def share(i: int) -> dict[int, bytes]:
        bundles = clients[i].share_keys(broadcast)
        return {p: sealing.seal(transport[i], pks[p], b"bench", 0, b) for p, b in bundles.items()}

    for i in ids:
        server.receive_bundles(i, timed(i, share, i))

    def upload(i: int) -> bytes:
        opened = {
            s: sealing.open_sealed(transport[i], pks[s], b"bench", 0, b, "bundle")
            for s, b in server.bundles_for(i).items()
        }
        weighted = (xs[i - 1].astype(np.float64) * weights[i - 1]).astype(np.float32)
        return bytes(clients[i].masked_update(opened, weighted))

    survivors = [i for i in ids if i != drop_before_upload]
    uploads = {i: timed(i, upload, i) for i in survivors}
    t0 = time.perf_counter()
    for i in survivors:
        server.receive_masked(uploads[i])
    request = server.unmask_request()
    aggregate = time.perf_counter() - t0
    reveals = [timed(i, clients[i].unmask, request) for i in survivors]
    t0 = time.perf_counter()
    for reveal in reveals:
        server.receive_reveal(reveal)
    total = server.aggregate()
    aggregate += time.perf_counter() - t0  # coordinator time only (silos' reveals excluded)
    t0 = time.perf_counter()
    config.codec.decode_sum(np.zeros(xs[0].size, dtype=np.uint32), n_terms=len(survivors))
    decode = time.perf_counter() - t0
    timings = {
        "encode_s": sum(silo_s[i] for i in survivors) / len(survivors),
        "aggregate_s": aggregate,
        "decode_s": decode,
    }
    return timings, total, len(uploads[survivors[0]])


def _masking(xs: list[NDArray[np.float32]], want: NDArray[np.float64]) -> dict[str, float]:
    timings, total, size = masking_round(xs)
    return {
        "encode_s": timings["encode_s"],
        "bytes_per_param": size / xs[0].size,
        "aggregate_s": timings["aggregate_s"],
        "decode_s": timings["decode_s"],
        "max_abs_err": float(np.abs(total - want).max()),
    }


def _ckks(xs: list[NDArray[np.float32]], want: NDArray[np.float64]) -> dict[str, float]:
    keys = ckks.CkksKeys.generate(ckks.CkksParams(clip=CLIP))
    public = keys.serialize_public()
    t0 = time.perf_counter()
    cts = [ckks.encrypt_update(keys, x, w) for x, w in zip(xs, WEIGHTS, strict=True)]
    encode = (time.perf_counter() - t0) / len(xs)
    t0 = time.perf_counter()
    agg = ckks.aggregate(public, cts)
    aggregate = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = ckks.decrypt_aggregate(keys, agg, xs[0].size)
    decode = time.perf_counter() - t0
    return {
        "encode_s": encode,
        "bytes_per_param": len(cts[0]) / xs[0].size,
        "aggregate_s": aggregate,
        "decode_s": decode,
        "max_abs_err": float(np.abs(total - want).max()),
    }


@contextmanager
def _silence_native_stdout() -> Iterator[None]:
    """TenSEAL prints a C++ warning per vector longer than N/2 (every FedShield tensor)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


def _fedshield(xs: list[NDArray[np.float32]]) -> dict[str, float]:
    context = ckks.fedshield_baseline_context()
    tensors = [[x[j : j + TENSOR] for j in range(0, x.size, TENSOR)] for x in xs]
    with _silence_native_stdout():
        t0 = time.perf_counter()
        per_silo = [ckks.fedshield_encrypt(context, t) for t in tensors]
        encode = (time.perf_counter() - t0) / len(xs)
    size = sum(len(c) for c in per_silo[0])
    t0 = time.perf_counter()
    agg = ckks.fedshield_aggregate(context, per_silo)
    aggregate = time.perf_counter() - t0
    del per_silo
    t0 = time.perf_counter()
    mean = np.concatenate(ckks.fedshield_decrypt(context, agg))
    decode = time.perf_counter() - t0
    want = np.mean([x.astype(np.float64) for x in xs], axis=0)
    return {
        "encode_s": encode,
        "bytes_per_param": size / xs[0].size,
        "aggregate_s": aggregate,
        "decode_s": decode,
        "max_abs_err": float(np.abs(mean - want).max()),
    }


def run(quick: bool, console: Console) -> dict[str, Any]:
    """Measure the four methods, print a table, return the JSON object."""
    length = QUICK_PARAMS if quick else FULL_PARAMS
    xs = make_updates(length)
    want = np.sum([x.astype(np.float64) * w for x, w in zip(xs, WEIGHTS, strict=True)], axis=0)
    results: dict[str, dict[str, float]] = {}
    for name, fn in (("plain", _plain), ("masking", _masking), ("ckks", _ckks)):
        console.log(f"secagg: {name}")
        results[name] = fn(xs, want)
    console.log("secagg: masking with one silo lost before upload")
    dropped, total, _ = masking_round(xs, drop_before_upload=4)
    want3 = sum(x.astype(np.float64) * w for x, w in zip(xs[:3], WEIGHTS[:3], strict=True))
    dropped_err = float(np.abs(total - want3).max())
    console.log("secagg: fedshield_baseline")
    results["fedshield_baseline"] = _fedshield(xs)

    table = Table(title=f"bench secagg: {length:,} parameters, {len(xs)} silos")
    for col in ("method", "encode s/silo", "bytes/param", "aggregate s", "decode s", "max |err|"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['encode_s']:.3f}",
            f"{r['bytes_per_param']:.6g}",
            f"{r['aggregate_s']:.3f}",
            f"{r['decode_s']:.3f}",
            f"{r['max_abs_err']:.2e}",
        )
    table.add_row(
        "masking, 1 silo lost before upload",
        f"{dropped['encode_s']:.3f}",
        "",
        f"{dropped['aggregate_s']:.3f}",
        "",
        f"{dropped_err:.2e}",
    )
    console.print(table)
    c, m, f = results["ckks"], results["masking"], results["fedshield_baseline"]
    console.print(
        f"targets: ckks {c['bytes_per_param']:.3f} B/param (<= 8), encode "
        f"{f['encode_s'] / c['encode_s']:.1f}x faster than fedshield_baseline (>= 3); masking "
        f"{m['bytes_per_param']:.6f} B/param (<= 4; a 30-byte header per upload); errors "
        f"{c['max_abs_err']:.1e} and {m['max_abs_err']:.1e} (<= 1e-4). masking aggregate_s "
        "includes unmasking and decoding; fedshield_baseline's error is against the unweighted "
        "mean it computes."
    )
    return {"bench": "secagg", "params": length, "silos": len(xs), "results": results}
