"""`silotune federate`: the Flower app's installed path, and a silo's pre-flight check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Deploy federated jobs on Flower (SuperLink, SuperNodes).", no_args_is_help=True
)


@app.command("app")
def app_dir() -> None:
    """Print the folder of the installed Flower app: flwr run "$(silotune federate app)" ..."""
    from silotune.federated.deploy_check import app_path

    typer.echo(str(app_path()))


@app.command()
def check(
    config: Annotated[Path, typer.Argument(help="The silo's job YAML.")],
    root_certificates: Annotated[
        Path | None,
        typer.Option(help="The CA certificate flower-supernode gets (keys/silo-K/ca.pem)."),
    ] = None,
    auth_supernode_private_key: Annotated[
        Path | None,
        typer.Option(help="The SuperNode key flower-supernode gets (keys/silo-K/supernode.key)."),
    ] = None,
    superlink: Annotated[
        str | None,
        typer.Option(help="The SuperLink's host:port: also ask it whether this key is registered."),
    ] = None,
) -> None:
    """Check a silo before it connects: job YAML, identity, enrollment, certificate, SuperNode key
    and (with --superlink) its registration; one line per problem, exit 1 if any."""
    from silotune.federated.deploy_check import check_silo

    report = check_silo(config, root_certificates, auth_supernode_private_key, superlink)
    for line in report.ok:
        typer.echo(f"ok: {line}")
    for line in report.problems:
        typer.echo(f"problem: {line}", err=True)
    if report.problems:
        raise typer.Exit(1)
    typer.echo("this silo is ready to start flower-supernode")
