"""The `silotune enclave` commands of the runtime: a simulated platform key.

`silotune enclave measure` (the trunk's measurement) belongs to split mode: split/cli.py.
"""

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
