"""`bench federated`: its rows over seeds and its target checks (the runs themselves are the bench)."""

from __future__ import annotations

from silotune.bench import federated


def test_rows_cover_every_seed_and_the_same_budget() -> None:
    rows = federated.rows(quick=False)
    names = {}
    for name, seed, job in rows:
        names.setdefault(name, []).append(seed)
        assert job["train"]["seed"] == seed
    assert names == {
        "centralized": [0, 1, 2],
        "iid_none": [0, 1, 2],
        "iid_masking": [0, 1, 2],
        "dirichlet_none": [0, 1, 2],
        "dirichlet_masking": [0, 1, 2],
        "iid_he": [0],
    }
    central = next(job for name, _, job in rows if name == "centralized")
    fed = next(job for name, _, job in rows if name == "iid_none")["federation"]
    silo_steps = fed["silos"] * fed["rounds"] * fed["local_steps"]
    assert central["train"]["max_steps"] == silo_steps  # same examples in all
    assert central["train"]["batch_size"] == next(j for *_, j in rows)["train"]["batch_size"]


def test_targets_report_the_measured_gap_and_whether_it_is_met() -> None:
    def row(*acc: float) -> dict[str, list[float]]:
        return {"accuracy": list(acc), "macro_f1": list(acc), "seeds": [0] * len(acc)}

    results = {
        "centralized": row(0.60, 0.62, 0.61),
        "iid_none": row(0.60, 0.60, 0.60),  # -1.0: within 2
        "iid_masking": row(0.58, 0.58, 0.58),  # -2.0 vs none: missed
        "dirichlet_none": row(0.50, 0.60, 0.55),  # -6.0 and a 10-point spread: missed
        "dirichlet_masking": row(0.55, 0.55, 0.55),
        "iid_he": row(0.6),
    }
    t = federated.check_targets(results)
    assert (
        t["iid_none_vs_centralized"]["met"]
        and round(t["iid_none_vs_centralized"]["points"], 6) == -1.0
    )
    assert not t["iid_masking_vs_none"]["met"]
    assert not t["dirichlet_none_vs_centralized"]["met"]
    assert t["dirichlet_masking_vs_none"]["met"]
    assert t["max_seed_spread"]["row"] == "dirichlet_none" and not t["max_seed_spread"]["met"]
