"""The `silotune enclave` commands: the measurement silos allow-list, and a simulated platform key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from silotune.errors import ConfigError

app = typer.Typer(
    help="Trusted execution (simulated backend): measurements and platform keys.",
    no_args_is_help=True,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable)."),
]


@app.command("measure")
def measure_command(
    config: Annotated[Path, typer.Argument(help="YAML job recipe with mode: split.")],
    set_: SetOption = None,
) -> None:
    """Print the trunk enclave's measurement for CONFIG (hex; put it in allowed_measurements).

    The measurement covers this silotune build's code, the job's model, adapter, train and split
    settings, and the enrollment in split.keys_dir/enrollment.json.
    """
    from silotune.config import load_config
    from silotune.enclave.measure import measure
    from silotune.enclave.trunk_app import trunk_app_config
    from silotune.split.keys import load_enrollment

    cfg = load_config(config, set_)
    if cfg.mode != "split":
        raise ConfigError(f"enclave measure needs a job with mode: split, got mode: {cfg.mode}")
    enrollment = load_enrollment(cfg.split.keys_dir, "trunk enclave's measurement")
    typer.echo(measure("trunk", trunk_app_config(cfg, enrollment)).hex())


@app.command("platform-key")
def platform_key_command(
    out: Annotated[Path, typer.Option(help="Folder for platform.key and platform.pub.")],
) -> None:
    """Create a simulated platform key pair (platform.key stays where enclaves run)."""
    from silotune.enclave.platform import PLATFORM_KEY, PLATFORM_PUB, write_platform_key

    for name in (PLATFORM_KEY, PLATFORM_PUB):
        if (out / name).exists():
            raise ConfigError(f"{out / name} already exists; platform keys are never overwritten")
    private, public = write_platform_key(out)
    Console(stderr=True).print(
        f"wrote the SIMULATED platform key {private} (coordinator: enclave.platform_key) and "
        f"{public} (silos: enclave.platform_key)"
    )
