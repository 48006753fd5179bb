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

from silotune.bench import fedshield
from silotune.crypto import box, he, masking, prg
from silotune.crypto.identity import Enrollment, IdentityKey
from silotune.secagg.masking_common import MASKED_INPUT
from silotune.secagg.masking_driver import MaskingDriver
from silotune.secagg.masking_silo import MaskingSilo, new_job_id
from silotune.secagg.policy import SiloPolicy

FULL_PARAMS = 4_194_304
QUICK_PARAMS = 262_144
WEIGHTS = (0.1, 0.2, 0.3, 0.4)
EXAMPLES = (1, 2, 3, 4)
REPEATS = 3  # signed example counts whose FedAvg weights are WEIGHTS
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
    examples: Sequence[int] = EXAMPLES,
    clip: float = CLIP,
) -> tuple[dict[str, float], NDArray[np.float32], int]:
    """One authenticated SecAgg round through the secagg driver and real silos.

    Silo ``i`` (1-based, enrolled as ``silo-{i-1}``) holds ``examples[i - 1]`` examples; the
    result is the example-weighted mean of the contributors' updates. Returns (timings, mean,
    bytes of one masked upload); timings include signing and verifying every key, bundle and
    view.
    """
    keys = {f"silo-{i}": IdentityKey.generate() for i in range(len(xs))}
    enrollment = Enrollment({n: k.public for n, k in keys.items()})
    policy = SiloPolicy("masking", 2, clip)
    names = sorted(keys)
    silos = {n: MaskingSilo(policy, keys[n], enrollment, n) for n in names}
    driver: MaskingDriver[str] = MaskingDriver(
        new_job_id(), 1, names, xs[0].size, clip, enrollment=enrollment
    )
    silo_s = dict.fromkeys(names, 0.0)
    coordinator_s = 0.0
    sent = received = 0  # protocol bytes besides the masked vector's values
    gone = names[drop_before_upload - 1] if drop_before_upload is not None else None

    def carry(stage: str, messages: dict[str, bytes]) -> dict[str, bytes]:
        nonlocal sent, received
        replies = {}
        for name, message in messages.items():
            if name == gone and stage == MASKED_INPUT:
                continue
            i = names.index(name)
            t0 = time.perf_counter()
            replies[name] = silos[name].handle(stage, message, examples=examples[i], update=xs[i])
            silo_s[name] += time.perf_counter() - t0
            received += len(message)
            sent += len(replies[name]) - (4 * xs[i].size if stage == MASKED_INPUT else 0)
        return replies

    while not driver.done:
        replies = carry(driver.stage, driver.messages())
        t0 = time.perf_counter()
        for name, reply in replies.items():
            driver.receive(name, reply)
        driver.advance()
        coordinator_s += time.perf_counter() - t0
    result = driver.result()
    contributors = result.contributors
    timings = {
        "encode_s": sum(silo_s[n] for n in contributors) / len(contributors),
        "aggregate_s": coordinator_s,
        "decode_s": 0.0,  # decoding is inside the coordinator's unmasking
        "auth_bytes_sent_per_silo": sent / len(names),
        "auth_bytes_received_per_silo": received / len(names),
    }
    return timings, result.mean, int(result.upload_bytes)


def auth_cost(length: int, clip: float = CLIP) -> dict[str, float]:
    """What signatures and the consistency check add to one round (4 silos, same vectors).

    Runs the bare protocol objects (no signatures, no consistency round, no message framing) and
    the authenticated driver with real silos on the same updates, all in this process; reports
    the fastest whole round of each (silos and coordinator together, so the difference includes
    the framing's copies of the masked vector) and the bytes each silo sends and receives besides
    the masked vector itself.
    """
    xs = make_updates(length)
    bare, full = [], []
    for _ in range(REPEATS):  # whole rounds are short: the fastest of a few repeats
        t0 = time.perf_counter()
        bare_bytes = _bare_round(xs, clip)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        timings, _, _ = masking_round(xs, clip=clip)
        full.append(time.perf_counter() - t0)
    bare_s, full_s = min(bare), min(full)
    return {
        "bare_round_s": bare_s,
        "authenticated_round_s": full_s,
        "extra_ms_per_round": 1000 * (full_s - bare_s),
        **bare_bytes,
        "auth_bytes_sent_per_silo": timings["auth_bytes_sent_per_silo"],
        "auth_bytes_received_per_silo": timings["auth_bytes_received_per_silo"],
    }


def _bare_round(xs: list[NDArray[np.float32]], clip: float) -> dict[str, float]:
    """The unauthenticated protocol objects alone (the pre-issue-10 round), as a baseline.

    Returns the bytes one silo sends and receives per round besides the masked vector.
    """
    ids = tuple(range(1, len(xs) + 1))
    config = masking.SecAggConfig(0, ids, len(ids) // 2 + 1, xs[0].size, clip)
    server = masking.MaskingServer(config)
    clients = {i: masking.MaskingClient(i) for i in ids}
    transport = {i: box.new_transport_key() for i in ids}
    pks = {i: box.public_bytes(k) for i, k in transport.items()}
    sent = received = 0
    for i in ids:
        received += len(config.to_bytes())
        message = clients[i].setup(config.to_bytes())
        sent += len(message) + 32  # with the transport key beside it
        server.receive_public_key(message)
    broadcast = server.key_broadcast()
    for i in ids:
        received += len(broadcast) + 32 * (len(ids) - 1)  # and the peers' transport keys
        bundles = clients[i].share_keys(broadcast)
        sealed = {p: box.seal(transport[i], pks[p], b"bench", 0, b) for p, b in bundles.items()}
        sent += sum(len(b) for b in sealed.values())
        server.receive_bundles(i, sealed)
    for i in ids:
        routed = server.bundles_for(i)
        received += sum(len(b) for b in routed.values())
        opened = {
            s: box.open_sealed(transport[i], pks[s], b"bench", 0, b, "bundle")
            for s, b in routed.items()
        }
        weighted = (xs[i - 1] * WEIGHTS[i - 1]).astype(np.float32)
        upload = clients[i].masked_update(opened, weighted)
        sent += 30  # the upload's header
        server.receive_masked(upload)
    request = server.unmask_request()
    for i in ids:
        received += len(request)
        reveal = clients[i].unmask(request)
        sent += len(reveal)
        server.receive_reveal(reveal)
    server.aggregate()
    n = len(ids)
    return {"bare_bytes_sent_per_silo": sent / n, "bare_bytes_received_per_silo": received / n}


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
    keys = he.HeKeys.generate(he.HeParams(clip=CLIP))
    public = keys.serialize_public()
    t0 = time.perf_counter()
    cts = [he.encrypt_update(keys, x, w) for x, w in zip(xs, WEIGHTS, strict=True)]
    encode = (time.perf_counter() - t0) / len(xs)
    t0 = time.perf_counter()
    agg = he.aggregate(public, cts)
    aggregate = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = he.decrypt_aggregate(keys, agg, xs[0].size)
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
    context = fedshield.baseline_context()
    tensors = [[x[j : j + TENSOR] for j in range(0, x.size, TENSOR)] for x in xs]
    with _silence_native_stdout():
        t0 = time.perf_counter()
        per_silo = [fedshield.encrypt(context, t) for t in tensors]
        encode = (time.perf_counter() - t0) / len(xs)
    size = sum(len(c) for c in per_silo[0])
    t0 = time.perf_counter()
    agg = fedshield.aggregate(context, per_silo)
    aggregate = time.perf_counter() - t0
    del per_silo
    t0 = time.perf_counter()
    mean = np.concatenate(fedshield.decrypt(context, agg))
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
    for name, fn in (("plain", _plain), ("masking", _masking), ("he", _ckks)):
        console.log(f"secagg: {name}")
        results[name] = fn(xs, want)
    console.log("secagg: masking with one silo lost before upload")
    dropped, total, _ = masking_round(xs, drop_before_upload=4)
    want3 = sum(x.astype(np.float64) * w for x, w in zip(xs[:3], WEIGHTS[:3], strict=True))
    want3 = want3 / sum(WEIGHTS[:3])  # the weighted mean over the three contributors
    dropped_err = float(np.abs(total - want3).max())
    console.log("secagg: cost of signatures and the consistency check")
    auth = auth_cost(length)
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
    c, m, f = results["he"], results["masking"], results["fedshield_baseline"]
    console.print(
        f"targets: ckks {c['bytes_per_param']:.3f} B/param (<= 8), encode "
        f"{f['encode_s'] / c['encode_s']:.1f}x faster than fedshield_baseline (>= 3); masking "
        f"{m['bytes_per_param']:.6f} B/param (<= 4; a 30-byte header per upload); errors "
        f"{c['max_abs_err']:.1e} and {m['max_abs_err']:.1e} (<= 1e-4). masking aggregate_s "
        "includes unmasking and decoding; fedshield_baseline's error is against the unweighted "
        "mean it computes."
    )
    console.print(
        f"active-adversary protections (signed keys, bundles and views; consistency round), "
        f"4 silos: a whole masking round {auth['bare_round_s']:.3f} s bare vs "
        f"{auth['authenticated_round_s']:.3f} s authenticated ({auth['extra_ms_per_round']:+.0f} "
        f"ms); bytes per silo per round besides the masked vector: "
        f"{auth['auth_bytes_sent_per_silo']:.0f} sent, {auth['auth_bytes_received_per_silo']:.0f} "
        f"received (bare: {auth['bare_bytes_sent_per_silo']:.0f} and "
        f"{auth['bare_bytes_received_per_silo']:.0f})."
    )
    return {
        "bench": "secagg",
        "params": length,
        "silos": len(xs),
        "results": results,
        "authentication": auth,
    }
