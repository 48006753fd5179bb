"""The `silotune serve` and `silotune join` commands (split mode across machines)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set split.address=0.0.0.0:50051."),
]


def serve(
    config: Annotated[Path, typer.Argument(help="YAML job recipe with mode: split.")],
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in output_dir.")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue from the trunk's newest checkpoint in output_dir (its adapter, "
            "optimizer and step); the silos join again with --resume."
        ),
    ] = False,
) -> None:
    """Run the coordinator's trunk server at split.address until every silo has finished.

    The trunk is checkpointed whenever every live silo has committed a sync step. A silo that
    dies while the others wait is dropped from the roster; an enrolled silo may join again
    after a crash (its new, authenticated session replaces the old one).
    """
    from silotune.config import load_config
    from silotune.split.runner import serve as run_server

    summary = run_server(load_config(config, set_), overwrite=overwrite, resume=resume)
    if "trunk_adapter_sealed" in summary:
        saved = (
            f"trunk adapter sealed by the simulated enclave to {summary['trunk_adapter_sealed']}"
        )
    else:
        saved = f"trunk adapter saved to {summary['trunk_adapter']}"
    Console(stderr=True).print(f"trunk server done: {summary['trunk_steps']} trunk steps; {saved}")


def join(
    config: Annotated[Path, typer.Argument(help="YAML job recipe with mode: split.")],
    silo: Annotated[
        str | None, typer.Option(help="This silo's enrolled name (default: split.silo_name).")
    ] = None,
    shard: Annotated[
        int | None,
        typer.Option(
            help="Train on IID part SHARD of split.silos parts (simulation); default all."
        ),
    ] = None,
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in output_dir.")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue from this silo's newest checkpoint in output_dir (its last synced "
            "head/tail adapter, optimizer and step), e.g. after a crash."
        ),
    ] = False,
) -> None:
    """Join a trunk server as a silo: train head and tail here, save the full adapter.

    A checkpoint is written at every sync step. After a crash, run the same command with
    --resume: the silo re-joins under its enrolled identity (replacing its old session) and
    continues from its last synced adapter.
    """
    from silotune.config import load_config
    from silotune.split.runner import join as run_join

    cfg = load_config(config, set_)
    name = silo or cfg.split.silo_name
    summary = run_join(cfg, name, shard=shard, overwrite=overwrite, resume=resume)
    console = Console(stderr=True)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["test"].items() if k != "examples")
    console.print(f"test: {shown}")
    console.print(f"adapter saved to {summary['adapter']} (PEFT format)")
    from silotune.train.run_folder import report_hint

    console.print(report_hint(cfg.output_dir), soft_wrap=True)


def enclave_measure(
    config: Annotated[Path, typer.Argument(help="YAML job recipe with mode: split.")],
    set_: SetOption = None,
) -> None:
    """Print the trunk enclave's measurement for CONFIG (hex; put it in allowed_measurements).

    The measurement covers this silotune build's code, the job's model, adapter, train and split
    settings, and the enrollment in split.keys_dir/enrollment.json.
    """
    from silotune.config import load_config
    from silotune.enclave.measure import measure
    from silotune.errors import ConfigError
    from silotune.split.keys import load_enrollment
    from silotune.split.trunk_app import trunk_app_config

    cfg = load_config(config, set_)
    if cfg.mode != "split":
        raise ConfigError(f"enclave measure needs a job with mode: split, got mode: {cfg.mode}")
    enrollment = load_enrollment(cfg.split.keys_dir, "trunk enclave's measurement")
    typer.echo(measure("trunk", trunk_app_config(cfg, enrollment)).hex())
