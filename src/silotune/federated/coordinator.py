"""The coordinator (Flower ServerApp main): rounds, server step, evaluation, checkpoints, outputs.

Outputs follow the centralized trainer: ``config.yaml``, ``metrics.jsonl`` (``step`` is the round),
``checkpoints/step-<round>/`` after every round (global adapter in PEFT format, server optimizer,
RNG; written atomically), ``adapter/`` and ``summary.json`` at the end. A restarted coordinator
(``--resume``) continues after the last completed round.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from numpy.typing import NDArray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from silotune.adapters.peft_adapters import save_adapter
from silotune.config import JobConfig
from silotune.crypto.identity import Enrollment
from silotune.errors import CheckpointError
from silotune.eval.evaluate import evaluate
from silotune.federated import dp, protocols
from silotune.federated.sparsify import (
    densify,
    kept_count,
    pruning_rate,
    random_support,
    topk_support,
)
from silotune.federated.strategy import apply_update, make_server_optimizer
from silotune.federated.vectors import FederationError, flatten
from silotune.secagg.masking_silo import new_job_id
from silotune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from silotune.train.job import build_job
from silotune.train.run_folder import (
    ADAPTER_DIR,
    METRICS_FILE,
    MetricsLog,
    format_scores,
    write_summary,
)
from silotune.train.schedule import Schedule

log = logging.getLogger(__name__)
NODE_WAIT_S = 60.0


class Coordinator:
    """Runs the rounds of one federated job against a Flower ``Grid``."""

    def __init__(
        self,
        cfg: JobConfig,
        grid: Grid,
        resume: bool,
        progress: bool,
        enrollment: Enrollment | None = None,
    ) -> None:
        self.cfg, self.fed, self.grid = cfg, cfg.federation, grid
        self.job_id = new_job_id()  # bound into every signature of this job's rounds
        self.enrollment = enrollment  # lets the coordinator drop silos with bad signatures
        self.resume, self.progress = resume, progress
        self.job = build_job(cfg)
        self.optimizer = make_server_optimizer(self.job.model, self.fed)
        self.he: protocols.HeSetup | None = None  # public-only HE material (ckks)
        self.previous: NDArray[np.float32] | None = None  # last dense mean update (topk_prev)
        self.upload_bytes: list[float] = []
        self._last_loss = float("nan")

    def _nodes(self) -> list[int]:
        """The connected silos; waits (bounded) until `federation.min_silos` have joined."""
        deadline = time.monotonic() + NODE_WAIT_S
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.fed.silos or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if len(nodes) < self.fed.min_silos:
            raise FederationError(
                f"only {len(nodes)} silo(s) connected within {NODE_WAIT_S:.0f} s; "
                f"federation.min_silos is {self.fed.min_silos}"
            )
        return nodes

    def _sample(self, nodes: list[int], round_no: int) -> list[int]:
        """`fraction` of the silos (at least min_silos), drawn by a (seed, round)-seeded RNG."""
        k = max(self.fed.min_silos, int(np.ceil(self.fed.fraction * len(nodes))))
        rng = random.Random(f"{self.cfg.train.seed}/{round_no}")  # sampling, not security
        return sorted(rng.sample(nodes, min(k, len(nodes))))

    def _support(self, round_no: int, length: int) -> NDArray[np.int64] | None:
        rate = pruning_rate(self.fed.pruning, round_no)
        if rate == 0.0:
            return None
        keep = kept_count(length, rate)
        if self.fed.pruning.support == "topk_prev" and self.previous is not None:
            return topk_support(self.previous, keep)
        return random_support(length, keep, self.cfg.train.seed, round_no)

    def _round(
        self, nodes: list[int], round_no: int, support: NDArray[np.int64] | None
    ) -> protocols.RoundResult:
        inp = protocols.RoundInput(
            self.job_id, round_no, flatten(self.job.model), support, self.enrollment
        )
        mode = self.fed.secure_aggregation
        if mode == "masking":
            return protocols.masking_round(self.grid, nodes, self.fed, inp)
        if mode == "he":
            assert self.he is not None
            return protocols.he_round(self.grid, nodes, self.fed, inp, self.he)
        return protocols.plain_round(self.grid, nodes, self.fed, inp)

    def _epsilon(self, rounds: int) -> dict[str, float] | None:
        d = self.fed.dp
        if not d.enabled:
            return None
        # Against the coordinator (it draws each round's sample): every round is a release.
        eps, order = dp.gaussian_epsilon(d.noise_multiplier, rounds, d.delta)
        out = {
            "epsilon": eps,
            "delta": d.delta,
            "noise_multiplier": d.noise_multiplier,
            "clip_norm": d.clip_norm,
            "rounds": rounds,
            "rdp_order": order,
            "accountant": "opacus-rdp",
        }
        silos = self.fed.silos
        chosen = min(silos, max(self.fed.min_silos, math.ceil(self.fed.fraction * silos)))
        if chosen < silos:  # against parties that do not know the sample: amplified
            rate = chosen / silos
            out["sample_rate"] = rate
            out["epsilon_sampled"] = dp.gaussian_epsilon(d.noise_multiplier, rounds, d.delta, rate)[
                0
            ]
        return out

    def run(self) -> dict[str, Any]:
        """Run (or resume) every round; returns the summary written to ``summary.json``."""
        cfg, fed, out = self.cfg, self.fed, self.cfg.output_dir
        start = 0
        if self.resume:
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                raise CheckpointError(f"--resume: {out} holds no checkpoint to resume from")
            start = load_checkpoint(ckpt, self.job.model, self.optimizer, None)["step"]
            log.info("Resuming the federation after round %d (%s)", start, ckpt)
        metrics = MetricsLog(out / METRICS_FILE, keep_until_step=start if self.resume else None)
        nodes = self._nodes()
        if fed.secure_aggregation == "he":
            self.he = protocols.he_setup(self.grid, nodes, fed, self.job_id)
            nodes = self.he.holders
        clock = time.perf_counter()
        bar = Progress(
            TextColumn("[bold]federated round"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            disable=not self.progress,
        )
        with bar:
            task = bar.add_task("rounds", total=fed.rounds, completed=start, loss="-")
            for round_no in range(start + 1, fed.rounds + 1):
                self._one_round(nodes, round_no, metrics, clock)
                bar.update(task, advance=1, loss=f"{self._last_loss:.4f}")
        train_s = time.perf_counter() - clock
        save_adapter(self.job.model, out / ADAPTER_DIR)
        j = self.job
        mc = j.splits.multiple_choice if cfg.eval.multiple_choice else None
        test = evaluate(
            j.model,
            j.task,
            j.splits.test,
            cfg.train.eval_batch_size,
            j.device,
            eval_cfg=cfg.eval,
            multiple_choice=mc,
        )
        metrics.write({"step": fed.rounds, "round": fed.rounds, "split": "test", **test})
        upload = float(np.mean(self.upload_bytes)) if self.upload_bytes else None
        summary = write_summary(
            cfg,
            train_s,
            test,
            with_steps=False,
            rounds=fed.rounds,
            silos=fed.silos,
            local_steps=fed.local_steps,
            strategy=fed.strategy,
            secure_aggregation=fed.secure_aggregation,
            upload_bytes_per_silo_per_round=upload,
            dp=self._epsilon(fed.rounds),
        )
        return summary

    def _one_round(
        self, nodes: list[int], round_no: int, metrics: MetricsLog, clock: float
    ) -> None:
        cfg, fed, j = self.cfg, self.fed, self.job
        chosen = self._sample(nodes, round_no)
        length = sum(p.numel() for p in self.optimizer.param_groups[0]["params"])
        support = self._support(round_no, length)
        result = self._round(chosen, round_no, support)
        dense = densify(result.mean_update, support, length)
        apply_update(j.model, self.optimizer, dense)
        self.previous = dense
        self._last_loss = result.loss
        self.upload_bytes.append(result.upload_bytes)
        record: dict[str, Any] = {
            "step": round_no,
            "round": round_no,
            "split": "train",
            "loss": result.loss,
            "silos": len(result.contributors),
            "dropped": len(result.dropped),
            "density": 1.0 - pruning_rate(fed.pruning, round_no),
            "upload_bytes_per_silo": result.upload_bytes,
            "mean_update_norm": float(np.mean(result.update_norms)) if result.update_norms else 0.0,
            "elapsed_s": time.perf_counter() - clock,
        }
        eps = self._epsilon(round_no)
        if eps is not None:
            record["dp_epsilon"] = eps["epsilon"]
        metrics.write(record)
        if Schedule.rounds(cfg).evaluates(round_no):
            scores = evaluate(
                j.model,
                j.task,
                j.splits.validation,
                cfg.train.eval_batch_size,
                j.device,
                eval_cfg=cfg.eval,
                generate_for=cfg.eval.generation_examples,  # periodic: capped, stays cheap
            )
            metrics.write({"step": round_no, "round": round_no, "split": "validation", **scores})
            log.info("round %d validation %s", round_no, format_scores(scores))
        save_checkpoint(
            cfg.output_dir,
            round_no,
            j.model,
            self.optimizer,
            None,
            extra={"round": round_no, "contributors": len(result.contributors)},
            keep=cfg.train.keep_checkpoints,
        )
