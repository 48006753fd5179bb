"""The Flower app for deployment (`flwr run` on SuperLink/SuperNodes): `server_app`, `client_app`.

The coordinator reads the job config from the run config key ``config`` (an absolute YAML path on
the SuperLink's machine; ``resume = true`` continues an interrupted job); each silo reads its own
from its node config (``--node-config "partition-id=0 config='/path/silo.yaml'"``), falling back
to the run config. The packaging is `flower_app/pyproject.toml`, shipped in the package:
`flwr run "$(silotune federate app)" ...` needs no checkout; see deploy/federated and docs/federated.md.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from silotune.config import load_config
from silotune.crypto.identity import Enrollment
from silotune.errors import ConfigError
from silotune.federated.coordinator import Coordinator
from silotune.federated.silo import make_client_app
from silotune.train.run_folder import prepare_output_dir

server_app = ServerApp()
client_app = make_client_app(None)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the coordinator of the job named by the run config."""
    raw = context.run_config.get("config")
    if not raw:
        raise ConfigError("flwr run needs --run-config \"config='/abs/path/job.yaml'\"")
    cfg = load_config(Path(str(raw)).expanduser())
    resume = bool(context.run_config.get("resume", False))
    prepare_output_dir(cfg, resume=resume, overwrite=False)
    roster = cfg.federation.enrollment  # optional on the coordinator: drops badly signed silos
    enrollment = Enrollment.load(Path(roster).expanduser()) if roster else None
    Coordinator(cfg, grid, resume=resume, progress=False, enrollment=enrollment).run()
