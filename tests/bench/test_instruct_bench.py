"""`bench instruct`: its rows' jobs (the runs themselves are the bench, `silotune bench instruct`)."""

from __future__ import annotations

import pytest

from silotune.bench import instruct


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_trained_row_sees_the_same_examples(tmp_path, quick) -> None:
    configs = {row: instruct.row_config(row, quick, tmp_path) for row in instruct.ROWS}
    seen = {row: instruct.examples_seen(cfg) for row, cfg in configs.items() if row != "untuned"}
    assert len(set(seen.values())) == 1 and next(iter(seen.values())) > 0, seen
    assert {cfg.model.name for cfg in configs.values()} == (
        {"tiny-llama"} if quick else {"smollm2-135m"}
    )
    assert all(cfg.data.task == "instruction" for cfg in configs.values())
    assert configs["federated"].federation.partition == "domain"
    assert configs["federated_iid"].federation.partition == "iid"
    assert {configs[r].federation.secure_aggregation for r in ("federated", "federated_iid")} == {
        "masking"
    }
    assert configs["split"].mode == "split" and configs["split"].split.silos == 2
    # the untuned row is scored with the centralized row's settings
    assert configs["untuned"].data == configs["centralized"].data


def test_the_bench_is_listed() -> None:
    from silotune.bench import BENCHMARKS

    assert BENCHMARKS["instruct"][1] == "silotune.bench.instruct"
