"""Server steps (FedAvg, FedAdam), the FedProx loss, masking state round trips, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silotune.config import config_from_dict
from silotune.config.federation import FederationConfig
from silotune.crypto import masking
from silotune.errors import ConfigError
from silotune.federated.silo import _prox_loss
from silotune.federated.strategy import apply_update, make_server_optimizer
from silotune.federated.vectors import flatten
from silotune.train.loop import forward_loss


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.frozen = torch.nn.Parameter(torch.tensor([9.0]), requires_grad=False)
        self.b = torch.nn.Parameter(torch.tensor([[0.5]]))


def test_fedavg_step_adds_the_mean_update() -> None:
    model = Tiny()
    opt = make_server_optimizer(model, FederationConfig(strategy="fedavg"))  # type: ignore[arg-type]
    apply_update(model, opt, np.array([0.1, -0.2, 0.3], dtype=np.float32))  # type: ignore[arg-type]
    assert np.allclose(flatten(model), [1.1, 1.8, 0.8])
    assert model.frozen.item() == 9.0


def test_fedadam_first_step_moves_each_value_by_the_server_lr() -> None:
    model = Tiny()
    fed = FederationConfig(strategy="fedadam", server_lr=0.05)
    opt = make_server_optimizer(model, fed)  # type: ignore[arg-type]
    apply_update(model, opt, np.array([0.001, -3.0, 0.2], dtype=np.float32))  # type: ignore[arg-type]
    # Bias-corrected Adam: the first step is lr * sign(update).
    assert np.allclose(flatten(model), [1.05, 1.95, 0.55], atol=1e-5)
    assert FederationConfig(strategy="fedadam").effective_server_lr == 0.01
    assert FederationConfig().effective_server_lr == 1.0


def test_fedprox_adds_the_proximal_term() -> None:
    class Lm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, input_ids, attention_mask):  # noqa: ARG002
            logits = self.w.expand(input_ids.shape[0], input_ids.shape[1], 3)
            return type("Out", (), {"logits": logits})()

    model = Lm()
    anchors = [torch.zeros(3)]
    batch = {
        "input_ids": torch.zeros(1, 4, dtype=torch.long),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.tensor([[0, 1, 2, 0]]),
    }
    with torch.no_grad():
        model.w.copy_(torch.tensor([1.0, 2.0, 2.0]))
    plain = forward_loss(model, batch)
    prox = _prox_loss(anchors, mu=0.5)(model, batch)
    assert float((prox - plain).detach()) == pytest.approx(0.25 * 9.0)


def test_masking_client_state_survives_a_process_boundary() -> None:
    ids = (1, 2, 3)
    cfg = masking.SecAggConfig(0, ids, 2, 5)
    server = masking.MaskingServer(cfg)
    states = {}
    for i in ids:
        client = masking.MaskingClient(i)
        server.receive_public_key(client.setup(cfg.to_bytes()))
        states[i] = client.export_state()
    broadcast = server.key_broadcast()
    for i in ids:
        client = masking.MaskingClient.restore_state(states[i])
        server.receive_bundles(i, client.share_keys(broadcast))
        states[i] = client.export_state()
    x = {i: np.full(5, 0.1 * i, dtype=np.float32) for i in ids}
    for i in ids:
        client = masking.MaskingClient.restore_state(states[i])
        server.receive_masked(client.masked_update(server.bundles_for(i), x[i]))
        states[i] = client.export_state()
    request = server.unmask_request()
    for i in ids:
        server.receive_reveal(masking.MaskingClient.restore_state(states[i]).unmask(request))
    assert np.allclose(server.aggregate(), 0.6, atol=cfg.codec.sum_tolerance(3))
    with pytest.raises(Exception, match="malformed"):
        masking.MaskingClient.restore_state(b"{not json")


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        ({"silos": 2, "min_silos": 3}, "min_silos \\(3\\) exceeds silos \\(2\\)"),
        ({"secure_aggregation": "masking", "min_silos": 1}, "needs min_silos >= 2"),
        ({"secure_aggregation": "he", "silos": 17}, "at most 16 silos"),
        ({"masking_threshold": 3, "min_silos": 2}, "masking_threshold must be <= min_silos"),
        ({"pruning": {"start_round": 5, "end_round": 2}}, "end_round must be >= "),
        ({"strategy": "fedsgd"}, "federation.strategy"),
        ({"dp": {"noise": 1.0}}, "unknown key 'federation.dp.noise'"),
        ({"max_examples": 0}, "federation.max_examples"),
    ],
)
def test_bad_federation_config_names_the_problem(federation: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"mode": "federated", "federation": federation})


def test_ckks_is_accepted_as_the_former_name_of_he(caplog) -> None:
    import logging

    from silotune.config.federation import FederationConfig

    with caplog.at_level(logging.WARNING):
        fed = FederationConfig(secure_aggregation="ckks")
    assert fed.secure_aggregation == "he"
    assert "'ckks' is deprecated; write 'he'" in caplog.text
