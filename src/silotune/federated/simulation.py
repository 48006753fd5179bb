"""`mode: federated` with `federation.simulation: true`: every silo on this machine via Flower's
simulation engine (the same ServerApp and ClientApp that run on SuperLink/SuperNode)."""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from silotune.config import JobConfig
from silotune.crypto.identity import Enrollment
from silotune.errors import ConfigError
from silotune.federated.coordinator import Coordinator
from silotune.federated.pinning import simulation_trust
from silotune.federated.silo import make_client_app, simulated_workers
from silotune.train.run_folder import prepare_output_dir
from silotune.train.threads import apply_threads, threads_per_process

log = logging.getLogger(__name__)


def make_server_app(
    cfg: JobConfig,
    resume: bool,
    progress: bool,
    out: dict[str, Any],
    enrollment: Enrollment | None = None,
) -> ServerApp:
    """A ServerApp whose main runs the coordinator; the summary or the error lands in `out`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            out["summary"] = Coordinator(cfg, grid, resume, progress, enrollment).run()
        except BaseException as exc:  # re-raised in the caller's thread after the simulation
            out["error"] = exc

    return app


def backend_config(cfg: JobConfig) -> dict[str, Any]:
    """Ray resources: one worker slot per silo run at once (:func:`simulated_workers`).

    Each silo then sets its own torch threads (``train.threads``, by default its share of the
    cores), so the slots count concurrency, not threads.
    """
    import torch

    workers = simulated_workers(cfg)
    gpus = 1.0 / cfg.federation.silos if torch.cuda.is_available() else 0.0
    return {
        "init_args": {"num_cpus": workers, "include_dashboard": False, "log_to_driver": False},
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
    }


def train_federated_simulation(
    cfg: JobConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    client_mods: list[Any] | None = None,
) -> dict[str, Any]:
    """Run a federated job on Flower's simulation engine; returns the summary.

    `client_mods` are Flower ClientApp mods wrapped around every silo (tests use one to make a
    silo drop out at a chosen stage).
    """
    if not cfg.federation.simulation:
        raise ConfigError(
            "federation.simulation is false: start the coordinator and silos with Flower "
            "(flower-superlink, flower-supernode, flwr run; see docs/federated.md)"
        )
    from flwr.simulation import run_simulation

    # Flower sets its logger to DEBUG on import and logs every simulation step; keep its
    # errors (its run_simulation deprecation notice is not for our users), and all of it when
    # silotune itself logs at DEBUG (--verbose).
    quiet = logging.getLogger("silotune").getEffectiveLevel() > logging.DEBUG
    logging.getLogger("flwr").setLevel(logging.ERROR if quiet else logging.DEBUG)
    prepare_output_dir(cfg, resume, overwrite)
    # The coordinator evaluates between rounds, while the silos wait: it may use every core.
    apply_threads(threads_per_process(cfg))
    out: dict[str, Any] = {}
    # Fresh Ed25519 identities per simulated silo: every key is signed and checked.
    trust = simulation_trust(cfg.federation.silos)
    server_app = make_server_app(cfg, resume, progress, out, trust[0].enrollment)
    client_app: ClientApp = make_client_app(cfg, client_mods, trust)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.silos,
            backend_config=backend_config(cfg),
        )
    finally:
        _stop_ray()
    if "error" in out:
        raise out["error"]
    if "summary" not in out:
        raise RuntimeError("the Flower simulation ended without running the coordinator")
    summary: dict[str, Any] = out["summary"]
    return summary


def _stop_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
