"""Federated rounds end to end in one process: the real coordinator and silos over InProcessGrid."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from safetensors.numpy import load_file

from silotune.adapters.peft_adapters import save_adapter
from silotune.config import JobConfig, config_from_dict
from silotune.crypto import he
from silotune.crypto.exceptions import KeyMaterialError
from silotune.crypto.fixedpoint import FixedPointCodec
from silotune.federated import silo
from silotune.federated.dp import gaussian_epsilon
from silotune.federated.vectors import FederationError, flatten, load_flat
from silotune.secagg import wire
from silotune.train.job import build_job
from tests.federated.harness import run_in_process

CLIP = 0.25


def make_cfg(tmp_path: Path, name: str, **federation: object) -> JobConfig:
    fed = {"silos": 3, "rounds": 1, "local_steps": 2, "min_silos": 2, "secagg_clip": CLIP}
    fed.update(federation)
    return config_from_dict(
        {
            "mode": "federated",
            "model": "tiny-llama",
            "data": {"dataset": "fortunes-sample", "max_length": 32, "max_eval_examples": 4},
            "train": {"batch_size": 4, "lr": 1e-3, "eval_batch_size": 16, "seed": 0},
            "output_dir": str(tmp_path / name),
            "federation": fed,
        }
    )


def adapter(cfg: JobConfig) -> np.ndarray:
    tensors = load_file(cfg.output_dir / "adapter" / "adapter_model.safetensors")
    return np.concatenate([tensors[k].reshape(-1) for k in sorted(tensors)])


def expected_fedavg(cfg: JobConfig, partitions: list[int]) -> np.ndarray:
    """Global after one FedAvg round, computed directly from each silo's local round."""
    job = build_job(cfg)
    global_vec = flatten(job.model)
    total, weight = np.zeros_like(global_vec, dtype=np.float64), 0
    for p in partitions:
        result, *_ = silo.local_round(cfg, p, global_vec, 1, None, None)
        total += result.examples * result.values.astype(np.float64)
        weight += result.examples
    load_flat(job.model, (global_vec + total / weight).astype(np.float32))
    out = cfg.output_dir.parent / f"expected-{cfg.output_dir.name}"
    save_adapter(job.model, out)
    tensors = load_file(out / "adapter_model.safetensors")
    return np.concatenate([tensors[k].reshape(-1) for k in sorted(tensors)])


def drop(partition: int, message_type: str):
    """A ClientApp mod: silo `partition` fails when it receives `message_type`."""

    def mod(message: Message, context: Context, call_next):
        if (
            context.node_config["partition-id"] == partition
            and message.metadata.message_type == message_type
        ):
            raise ConnectionError(f"silo {partition} lost at {message_type}")
        return call_next(message, context)

    return mod


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobConfig, np.ndarray, dict]:
    cfg = make_cfg(tmp_path_factory.mktemp("plain"), "none")
    summary, _, _ = run_in_process(cfg)
    return cfg, adapter(cfg), summary


def test_plain_round_is_example_weighted_mean_of_local_minus_global(plain) -> None:
    cfg, got, summary = plain
    want = expected_fedavg(cfg, [0, 1, 2])
    assert np.abs(got - want).max() < 1e-6
    assert summary["mode"] == "federated" and summary["rounds"] == 1
    # Only adapter tensors travel: the upload is 4 bytes per adapter parameter.
    assert summary["upload_bytes_per_silo_per_round"] == 4 * got.size
    assert (cfg.output_dir / "checkpoints" / "step-00000001").is_dir()
    records = [
        json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["split"] for r in records] == ["train", "validation", "test"]
    assert records[0]["silos"] == 3 and records[0]["dropped"] == 0


@pytest.mark.parametrize("mode", ["masking", "he"])
def test_secure_aggregation_equals_plain_weighted_fedavg(tmp_path: Path, plain, mode: str) -> None:
    _, want, plain_summary = plain
    cfg = make_cfg(tmp_path, mode, secure_aggregation=mode)
    summary, _, _ = run_in_process(cfg)
    got = adapter(cfg)
    if mode == "masking":
        tol = FixedPointCodec(clip=CLIP, n_silos=3, bits=32).sum_tolerance(3)
        assert summary["upload_bytes_per_silo_per_round"] < 4.01 * got.size
    else:
        tol = he.HeParams(clip=CLIP).codec.sum_tolerance(3)
    assert np.abs(got - want).max() <= tol + 1e-7
    assert summary["secure_aggregation"] == mode


def test_masking_silo_lost_after_upload_does_not_stop_the_round(
    tmp_path: Path, plain, caplog
) -> None:
    _, want, _ = plain
    cfg = make_cfg(tmp_path, "lost", secure_aggregation="masking")
    with caplog.at_level(logging.WARNING):
        run_in_process(cfg, mods=[drop(2, "train.mask_unmask")])
    assert "missed stage unmask" in caplog.text and "still counts" in caplog.text
    # The lost silo uploaded, so its update is in the sum: same result as with all three.
    tol = FixedPointCodec(clip=CLIP, n_silos=3, bits=32).sum_tolerance(3)
    assert np.abs(adapter(cfg) - want).max() <= tol + 1e-7
    train = [
        line
        for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert '"silos": 3' in train[0]


def test_masking_silo_lost_before_upload_is_left_out(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "before", secure_aggregation="masking")
    run_in_process(cfg, mods=[drop(1, "train.mask_collect")])
    want = expected_fedavg(cfg, [0, 2])
    tol = FixedPointCodec(clip=CLIP, n_silos=3, bits=32).sum_tolerance(3)
    assert np.abs(adapter(cfg) - want).max() <= tol + 1e-6


def test_dropout_round_completes_with_the_rest_when_min_silos_remain(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "drop")
    run_in_process(cfg, mods=[drop(1, "train.plain")])
    assert np.abs(adapter(cfg) - expected_fedavg(cfg, [0, 2])).max() < 1e-6


def test_round_fails_clearly_below_min_silos(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "fail", min_silos=3)
    with pytest.raises(
        FederationError, match=r"only 2 silo\(s\) completed stage train; federation.min_silos is 3"
    ):
        run_in_process(cfg, mods=[drop(0, "train.plain")])


def test_ckks_coordinator_context_cannot_decrypt(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "he", secure_aggregation="he")
    _, coordinator, grid = run_in_process(cfg)
    public = he.HeKeys.load(coordinator.he.public_context)
    assert not public.is_private
    with pytest.raises(KeyMaterialError, match="secret key"):
        he.decrypt_aggregate(public, he.encrypt_update(public, np.zeros(8), 0.5), 8)
    with pytest.raises(KeyMaterialError):
        public.serialize_secret()
    # The secret went to the peers only sealed: no message the coordinator relayed holds it.
    leader_state = grid.contexts[min(grid.contexts)].state.config_records["silotune"]
    secret = bytes(leader_state["he_secret"])
    assert he.HeKeys.load(secret).is_private
    # Chunks from all over the secret (its key material, not only its tail), in every array and
    # config record of every message the coordinator sent.
    chunks = [secret[i : i + 48] for i in range(0, len(secret) - 48, max(1, len(secret) // 40))]
    for msg in grid.sent:
        blobs = [r[n].numpy().tobytes() for r in msg.content.array_records.values() for n in r]
        blobs += [
            str(v).encode() if not isinstance(v, bytes) else v
            for r in msg.content.config_records.values()
            for v in r.values()
        ]
        for blob in blobs:
            assert not any(chunk in blob or chunk.hex().encode() in blob for chunk in chunks)


def _edit_msg(content, stage: str, change) -> None:
    """Rewrite the secure-aggregation message inside a Flower reply (as the network might)."""
    reader, payload = wire.unpack(
        content.array_records["arrays"]["msg"].numpy().tobytes(), stage, "t"
    )
    doc = dict(reader.doc)
    doc.pop("stage")
    change(doc)
    content.array_records["arrays"]["msg"] = silo.to_array(wire.pack(stage, doc, payload))


def test_tampered_share_bundle_drops_its_sender(tmp_path: Path, caplog) -> None:
    def flip(message_type: str, node: int, content) -> None:
        if message_type == "train.mask_share" and node == 1000:

            def change(doc):
                sealed = bytearray(bytes.fromhex(doc["bundles"]["3"]["sealed"]))
                sealed[-1] ^= 1
                doc["bundles"]["3"]["sealed"] = sealed.hex()

            _edit_msg(content, "share_keys", change)

    cfg = make_cfg(tmp_path, "tamper", secure_aggregation="masking")
    with caplog.at_level(logging.WARNING):
        run_in_process(cfg, tamper=flip)
    assert "its share bundle for silo 3: the signature does not verify" in caplog.text
    # The silo whose bundle was changed left the round; the round finished without it.
    tol = FixedPointCodec(clip=CLIP, n_silos=3, bits=32).sum_tolerance(3)
    assert np.abs(adapter(cfg) - expected_fedavg(cfg, [1, 2])).max() <= tol + 1e-6


def test_tampered_ciphertext_drops_its_silo(tmp_path: Path, caplog) -> None:
    def flip(message_type: str, node: int, content) -> None:
        if message_type == "train.he_train" and node == 1001:
            blob = bytearray(content.array_records["arrays"]["ciphertext"].numpy().tobytes())
            blob[len(blob) // 2] ^= 0x40
            content.array_records["arrays"]["ciphertext"] = silo.to_array(bytes(blob))

    cfg = make_cfg(tmp_path, "tamper-he", secure_aggregation="he")
    with caplog.at_level(logging.WARNING):
        run_in_process(cfg, tamper=flip)
    assert "silo node 1001 dropped: the ciphertext of silo 'silo-1'" in caplog.text
    tol = he.HeParams(clip=CLIP).codec.sum_tolerance(3)
    assert np.abs(adapter(cfg) - expected_fedavg(cfg, [0, 2])).max() <= tol + 1e-6


def test_tampered_secret_context_is_rejected(tmp_path: Path, caplog) -> None:
    def flip(message_type: str, node: int, content) -> None:
        if message_type == "train.he_keygen":
            blob = bytearray(content.array_records["sealed"]["1002"].numpy().tobytes())
            blob[100] ^= 1
            content.array_records["sealed"]["1002"] = silo.to_array(bytes(blob))

    cfg = make_cfg(tmp_path, "tamper-key", secure_aggregation="he")
    with caplog.at_level(logging.WARNING):
        _, coordinator, _ = run_in_process(cfg, tamper=flip)
    assert coordinator.he.holders == [1000, 1001]
    assert "HE secret context from the key leader failed authentication" in caplog.text


def test_restarted_coordinator_resumes_from_the_last_round(tmp_path: Path) -> None:
    full = make_cfg(tmp_path, "full", rounds=2)
    run_in_process(full)
    crash = make_cfg(tmp_path, "crash", rounds=2)

    def crash_in_round_2(message: Message, context: Context, call_next):
        if message.metadata.group_id == "2":
            raise ConnectionError("coordinator network down")
        return call_next(message, context)

    with pytest.raises(FederationError, match="round 2 failed"):
        run_in_process(crash, mods=[crash_in_round_2])
    assert (crash.output_dir / "checkpoints" / "step-00000001").is_dir()
    assert not (crash.output_dir / "summary.json").exists()
    summary, _, _ = run_in_process(crash, resume=True)
    assert summary["rounds"] == 2
    assert np.array_equal(adapter(crash), adapter(full))  # same seed: bit-identical
    rounds = [
        line
        for line in (crash.output_dir / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert len(rounds) == 2


@pytest.mark.parametrize("mode", ["none", "masking", "he"])
def test_pruning_shrinks_upload_in_proportion_to_density(tmp_path: Path, plain, mode: str) -> None:
    length = plain[1].size
    pruning = {"enabled": True, "start_round": 1, "end_round": 1, "target_rate": 0.75}
    cfg = make_cfg(tmp_path, mode, secure_aggregation=mode, pruning=pruning)
    sparse = run_in_process(cfg)[0]["upload_bytes_per_silo_per_round"]
    kept = int(np.ceil(length * 0.25))
    if mode == "none":  # float32 values on the support only
        assert sparse == 4 * kept
    elif mode == "masking":  # uint32 values plus a fixed 30-byte header
        assert sparse == 4 * kept + 30
    else:  # whole BFV ciphertexts of 8192 values (about 64 KiB each)
        dense = make_cfg(tmp_path, "dense", secure_aggregation="he")
        full = run_in_process(dense)[0]["upload_bytes_per_silo_per_round"]
        ratio = np.ceil(kept / 8192) / np.ceil(length / 8192)
        assert sparse / full == pytest.approx(ratio, rel=0.05)
        assert sparse < 0.4 * full
    train = json.loads((cfg.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert train["density"] == pytest.approx(0.25)


def test_dp_reports_epsilon_and_changes_the_update(tmp_path: Path, plain) -> None:
    _, want, _ = plain
    dp = {"enabled": True, "clip_norm": 0.05, "noise_multiplier": 1.2, "delta": 1e-5}
    cfg = make_cfg(tmp_path, "dp", dp=dp)
    summary, _, _ = run_in_process(cfg)
    eps, _ = gaussian_epsilon(1.2, 1, 1e-5)
    assert summary["dp"]["epsilon"] == pytest.approx(eps)
    assert summary["dp"]["noise_multiplier"] == 1.2
    assert np.abs(adapter(cfg) - want).max() > 1e-3


def _deployed_silos(tmp_path: Path, cfg: JobConfig, identities: bool) -> list[Path]:
    """One YAML per silo, each naming its own identity key and the enrollment (or neither)."""
    from silotune.config import dump_config
    from silotune.crypto.identity import Enrollment, IdentityKey

    keys = {f"silo-{i}": IdentityKey.generate() for i in range(cfg.federation.silos)}
    Enrollment({n: k.public for n, k in keys.items()}).save(tmp_path / "enrollment.json")
    paths = []
    for name, key in keys.items():
        fed = {}
        if identities:
            key.save(tmp_path / f"{name}.pem", overwrite=True)
            fed = {"identity_key": str(tmp_path / f"{name}.pem")}
            fed["enrollment"] = str(tmp_path / "enrollment.json")
        silo_cfg = cfg.model_copy(
            update={"federation": cfg.federation.model_copy(update=fed)}, deep=True
        )
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(dump_config(silo_cfg))
    return paths


def _deployed_grid(tmp_path: Path, cfg: JobConfig, identities: bool):
    """An in-process grid of deployed silos, each reading its own YAML (see _deployed_silos)."""
    from flwr.app import RecordDict

    from silotune.federated.silo import make_client_app
    from tests.federated.harness import InProcessGrid

    paths = _deployed_silos(tmp_path, cfg, identities)
    grid = InProcessGrid(make_client_app(None), cfg.federation.silos)
    for node, context in grid.contexts.items():
        context.node_config = {"partition-id": node - 1000, "config": str(paths[node - 1000])}
        context.state = RecordDict()
    return grid


def _coordinate(cfg: JobConfig, grid) -> None:
    """Run a coordinator of ``cfg`` over ``grid`` (a fresh output folder)."""
    from silotune.federated.coordinator import Coordinator
    from silotune.federated.local_grid import task_identity
    from silotune.train.run_folder import prepare_output_dir

    prepare_output_dir(cfg, resume=False, overwrite=True)
    with task_identity():
        Coordinator(cfg, grid, resume=False, progress=False).run()


def test_deployment_app_reads_each_silo_config_from_its_node_config(tmp_path: Path) -> None:
    from silotune.federated.silo import make_client_app
    from tests.federated.harness import InProcessGrid

    cfg = make_cfg(tmp_path, "deploy", secure_aggregation="masking")
    _coordinate(cfg, _deployed_grid(tmp_path, cfg, identities=True))
    assert (cfg.output_dir / "summary.json").is_file()
    bare_cfg = make_cfg(tmp_path, "bare", silos=2)
    bare = InProcessGrid(make_client_app(None), 2)  # SuperNodes started without a job config
    with pytest.raises(FederationError, match=r"only 0 silo\(s\) completed"):
        _coordinate(bare_cfg, bare)


def test_a_deployed_silo_without_identity_refuses_secure_aggregation(tmp_path: Path, caplog):
    cfg = make_cfg(tmp_path, "noid", secure_aggregation="masking")
    grid = _deployed_grid(tmp_path, cfg, identities=False)
    with caplog.at_level(logging.WARNING), pytest.raises(FederationError):
        _coordinate(cfg, grid)
    assert "a deployed silo needs federation.identity_key and federation.enrollment" in caplog.text


def test_a_silo_refuses_a_plain_round_when_its_config_demands_masking(tmp_path: Path, caplog):
    """Issue 10, finding 6: the coordinator chose the protection; now each silo enforces its own."""
    grid = _deployed_grid(tmp_path, make_cfg(tmp_path, "silo", secure_aggregation="masking"), True)
    coordinator_cfg = make_cfg(tmp_path, "coordinator", secure_aggregation="none")
    with caplog.at_level(logging.WARNING), pytest.raises(FederationError):
        _coordinate(coordinator_cfg, grid)
    assert "asked for secure aggregation 'none', but this silo's config demands 'masking'" in (
        caplog.text
    )
    plain_uploads = [m for m in grid.sent if m.metadata.message_type == "train.plain"]
    assert plain_uploads  # the coordinator asked...
    assert not (coordinator_cfg.output_dir / "adapter").exists()  # ...and got no update


def test_substituted_transport_key_is_detected(tmp_path: Path, caplog) -> None:
    from silotune.crypto.box import new_transport_key, public_bytes

    def substitute(message_type: str, node: int, content) -> None:
        if message_type == "train.mask_setup" and node == 1000:
            fake = public_bytes(new_transport_key()).hex()  # the coordinator's own key
            _edit_msg(content, "advertise", lambda d: d["advert"].update(transport_pk=fake))

    cfg = make_cfg(tmp_path, "mitm", secure_aggregation="masking")
    with caplog.at_level(logging.WARNING):
        run_in_process(cfg, tamper=substitute)
    assert "the keys of silo 1 ('silo-0'), substituted or replayed?" in caplog.text


def test_substituted_key_never_receives_the_he_secret(tmp_path: Path) -> None:
    from silotune.crypto.box import new_transport_key, public_bytes

    def substitute(message_type: str, node: int, content) -> None:
        if message_type == "train.hello" and node == 1002:
            fake = public_bytes(new_transport_key())
            content.array_records["arrays"]["transport_pk"] = silo.to_array(fake)

    cfg = make_cfg(tmp_path, "mitm-he", secure_aggregation="he")
    with pytest.raises(FederationError, match="key leader failed .*not signed by enrolled silo"):
        run_in_process(cfg, tamper=substitute)


def test_fedadam_server_step_moves_each_value_by_server_lr_along_the_mean_update(
    tmp_path: Path, plain
) -> None:
    _, fedavg, _ = plain  # init + mean update
    cfg = make_cfg(tmp_path, "adam", strategy="fedadam", server_lr=0.01)
    job = build_job(cfg)
    save_adapter(job.model, tmp_path / "init")
    tensors = load_file(tmp_path / "init" / "adapter_model.safetensors")
    init = np.concatenate([tensors[k].reshape(-1) for k in sorted(tensors)])
    run_in_process(cfg)
    moved = np.abs(fedavg - init) > 1e-6
    assert moved.mean() > 0.5
    step = adapter(cfg) - init
    # First bias-corrected Adam step on the pseudo-gradient -mean: server_lr * sign(mean).
    assert np.allclose(step[moved], 0.01 * np.sign(fedavg - init)[moved], atol=1e-5)


@pytest.mark.parametrize("lie", ["times10", "nan"])
def test_a_lying_decrypter_is_caught_and_the_round_uses_honest_ones(
    tmp_path: Path, plain, caplog, lie
):
    """Issue 10, finding 5: a decrypting silo returned sum x 10 or NaN and it was accepted."""
    _, want, _ = plain

    def lying(message_type: str, node: int, content) -> None:
        if message_type == "train.he_decrypt" and node == 1000:
            values = content.array_records["arrays"]["sum"].numpy()
            bad = values * 10 if lie == "times10" else np.full_like(values, np.nan)
            content.array_records["arrays"]["sum"] = silo.to_array(bad.astype(np.float32))

    cfg = make_cfg(tmp_path, f"liar-{lie}", secure_aggregation="he")
    with caplog.at_level(logging.WARNING):
        run_in_process(cfg, tamper=lying)
    assert "silo node 1000 returned a bad sum" in caplog.text
    tol = he.HeParams(clip=CLIP).codec.sum_tolerance(3)
    assert np.abs(adapter(cfg) - want).max() <= tol + 1e-7


def test_a_deployed_silo_trains_on_all_of_its_own_data(tmp_path: Path) -> None:
    """Issue 10, finding 7: deployment applied the simulation's partition to a silo's own data."""
    simulated = make_cfg(tmp_path, "sim", silos=3)
    deployed = simulated.model_copy(
        update={"federation": simulated.federation.model_copy(update={"simulation": False})},
        deep=True,
    )
    job = silo.local_job(simulated)
    total = len(job.stream.examples)
    part, *_ = silo.local_round(simulated, 1, flatten(job.model), 1, None, None)
    everything, *_ = silo.local_round(deployed, 1, flatten(job.model), 1, None, None)
    assert part.examples < total // 2
    assert everything.examples == total
