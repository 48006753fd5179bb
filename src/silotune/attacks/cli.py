"""`silotune attack NAME CONFIG [--run DIR]`: run one privacy attack on a job; one JSON line last."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from silotune.errors import ConfigError


def attack(
    name: Annotated[str, typer.Argument(help="Attack name (see `silotune attack --list`).")] = "",
    config: Annotated[
        Path | None, typer.Argument(help="YAML job recipe the attack targets.")
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(help="A finished run's output_dir: the silo starts from its adapter."),
    ] = None,
    trained_steps: Annotated[
        int, typer.Option(help="Train this many steps before the observed ones.")
    ] = 0,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List attacks and exit.")] = False,
) -> None:
    """Run a privacy attack against a job's settings: leakage, chance, cost (one JSON line)."""
    import torch

    from silotune.attacks import ATTACKS, format_leakage
    from silotune.attacks.run import run_attack
    from silotune.config import load_config

    if list_ or not name:
        for key, desc in ATTACKS.items():
            typer.echo(f"{key:18s} {desc}")
        return
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack '{name}' (available: {', '.join(ATTACKS)})")
    if config is None:
        raise ConfigError(f"attack '{name}' needs a job config: silotune attack {name} CONFIG")
    torch.set_num_threads(1)
    cfg = load_config(config, set_)
    adapter = None
    if run is not None:
        adapter = run / "adapter"
        if not adapter.is_dir():
            raise ConfigError(f"--run {run}: no adapter/ folder there; pass a finished run")
    result = run_attack(name, cfg, trained_steps=trained_steps, adapter=adapter)
    rows = result["rows"] if "rows" in result else [result]
    for row in rows:
        leakage, chance = format_leakage(name, row["leakage"]), format_leakage(name, row["chance"])
        typer.echo(f"{name}: leakage {leakage} (chance {chance}) at {row['setting']}")
    typer.echo(json.dumps({"attack": name, "results": rows}))
