"""The first log line of every split run: the measured leakage of its own settings, and what stops it.

No setting of ``split.head_layers``, ``noise_sigma`` or ``activation_dtype`` brought the lab's
strongest coordinator attack to 5% of tokens at a usable accuracy (docs/privacy.md), so split's
defaults stay as they are and every split run says instead what its settings leak. The numbers
are those of ``silotune bench privacy`` (full, SmolLM2-135M), kept in ``measured_leakage.json`` beside
this module (:func:`write_measured` refreshes it from the bench's JSON line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from silotune.config import JobConfig

__all__ = ["leakage_notice", "write_measured"]

MEASURED = Path(__file__).resolve().parent / "measured_leakage.json"
COORDINATOR_ATTACKS = ("split-nearest", "split-learned")
KEYS = ("head_layers", "noise_sigma", "activation_dtype")


def write_measured(bench: dict[str, Any], path: Path = MEASURED) -> None:
    """Keep, from a full ``bench privacy`` JSON object, each setting's strongest token leakage."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for attack in (*COORDINATOR_ATTACKS, "split-ciphertext"):
        for row in bench["results"].get(attack, []):
            s = row["setting"]
            key = (*(s[k] for k in KEYS), s["trunk_in_enclave"], s["trained_steps"])
            best = rows.get(key)
            if best is None or row["leakage"] > best["leakage"]:
                rows[key] = {**{k: s[k] for k in KEYS}, "trunk_in_enclave": s["trunk_in_enclave"],
                             "trained_steps": s["trained_steps"], "attack": attack,
                             "leakage": row["leakage"], "chance": row["chance"]}  # fmt: skip
    data = {"model": bench["model"], "rows": sorted(rows.values(), key=lambda r: str(r))}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _load() -> dict[str, Any]:
    return json.loads(MEASURED.read_text(encoding="utf-8"))


def leakage_notice(cfg: JobConfig) -> str:
    """One sentence: what this split job's settings leak to the coordinator, and what stops it."""
    s = cfg.split
    data = _load()
    model = data["model"]
    if s.trunk_in_enclave:
        row = next((r for r in data["rows"] if r["trunk_in_enclave"]), None)
        got = f"{row['leakage']:.0%} of tokens (chance {row['chance']:.0%})" if row else "nothing"
        return (
            f"Privacy: the trunk runs in the (simulated) enclave; the coordinator's host relays "
            f"only ciphertext, from which the lab's attack recovered {got} on {model} "
            "(docs/privacy.md)."
        )
    plain = [r for r in data["rows"] if not r["trunk_in_enclave"] and not r["trained_steps"]]
    same = [r for r in plain if all(r[k] == getattr(s, k) for k in KEYS)]
    if same:
        row = same[0]
        measured = (
            f"lets the coordinator recover {row['leakage']:.0%} of a silo's tokens from the "
            f"head activations ({row['attack']}, {model}; chance {row['chance']:.0%})"
        )
    else:
        near = min(plain, key=lambda r: (abs(r["head_layers"] - s.head_layers),
                                         abs(r["noise_sigma"] - s.noise_sigma),
                                         r["activation_dtype"] != s.activation_dtype))  # fmt: skip
        measured = (
            "was not measured as such; the closest measured setting "
            f"(head_layers {near['head_layers']}, noise_sigma {near['noise_sigma']:g}, "
            f"{near['activation_dtype']}) lets the coordinator recover {near['leakage']:.0%} of "
            f"a silo's tokens ({near['attack']}, {model})"
        )
    return (
        f"Privacy: this split job (head_layers {s.head_layers}, noise_sigma {s.noise_sigma:g}, "
        f"{s.activation_dtype} on the wire) {measured}. split.trunk_in_enclave: true stops it "
        "(the coordinator's host then sees only ciphertext); see docs/privacy.md."
    )
