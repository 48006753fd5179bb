"""Masked outsourcing of frozen linears: exact within float32, and the REE sees only masked data."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from silotune.adapter_tee.masked_linear import (
    FrozenLinearServer,
    LinearOffload,
    OutsourcedLinear,
    TamperedResultError,
    from_wire,
    outsource_linears,
    to_wire,
)
from silotune.adapter_tee.masked_stream import MaskStream

Tensors = dict[str, torch.Tensor]


class Recorder:
    """The REE: serves the frozen weights and keeps every tensor it was sent."""

    def __init__(self, server: FrozenLinearServer) -> None:
        self.server = server
        self.seen: list[tuple[str, str, torch.Tensor]] = []

    def __call__(self, method: str, meta: dict[str, Any], tensors: Tensors) -> tuple[dict, Tensors]:
        for tensor in tensors.values():
            self.seen.append((method, meta["name"], from_wire(tensor).clone()))
        return self.server(method, meta, tensors)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(16, 24, bias=False)
        self.c = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.a(x)) * self.b(x))  # a and b share their input


def _pair(mask_std: float) -> tuple[TwoLayer, TwoLayer, Recorder, LinearOffload]:
    torch.manual_seed(0)
    plain = TwoLayer()
    enclave = TwoLayer()
    enclave.load_state_dict(plain.state_dict())
    recorder = Recorder(FrozenLinearServer.from_model(plain))
    offload = LinearOffload(MaskStream(bytes(32)), mask_std, ocall=recorder)
    assert outsource_linears(enclave, offload) == ["a", "b", "c"]
    return plain, enclave, recorder, offload


@pytest.mark.parametrize("mask_std", [1.0, 1e4, 1e6])
def test_forward_and_input_gradient_equal_the_plain_layers(mask_std: float) -> None:
    plain, enclave, _, _ = _pair(mask_std)
    x = torch.randn(3, 5, 16)
    x0, x1 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y0, y1 = plain(x0), enclave(x1)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    (y0 * y0.detach()).sum().backward()
    (y1 * y0.detach()).sum().backward()
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-5, atol=1e-6)
    # The frozen weights get no gradient; they are not even asked for one.
    assert all(p.grad is None for p in enclave.parameters())


def test_the_ree_receives_only_masked_tensors() -> None:
    _, enclave, recorder, offload = _pair(1e4)
    x = torch.randn(4, 16, requires_grad=True)
    seen_inputs: list[torch.Tensor] = []
    for module in (enclave.a, enclave.b, enclave.c):
        module.register_forward_hook(lambda m, args, out: seen_inputs.append(args[0].detach()))
    enclave(x).sum().backward()
    methods = [(m, n) for m, n, _ in recorder.seen]
    assert methods == [
        ("linear", "a"),
        ("linear", "b"),
        ("linear", "c"),
        ("linear_t", "c"),
        ("linear_t", "b"),
        ("linear_t", "a"),
    ]
    for (_, _, sent), clear in zip(recorder.seen[:3], seen_inputs, strict=True):
        # Every sent element sits far from the true one, and the two are uncorrelated.
        assert float((sent - clear).abs().min()) > 0
        assert float((sent - clear).abs().mean()) > 100 * float(clear.abs().max())
        corr = torch.corrcoef(torch.stack([sent.flatten(), clear.double().flatten()]))[0, 1]
        assert abs(float(corr)) < 0.3
    # a and b share their input: the REE gets that one masked tensor twice, never two maskings.
    assert torch.equal(recorder.seen[0][2], recorder.seen[1][2])
    assert offload.stats.masks == 5 and offload.stats.ocalls == 6


def test_every_mask_comes_from_unused_keystream() -> None:
    _, enclave, _, offload = _pair(10.0)
    drawn: list[tuple[int, int]] = []
    original = offload.masks.gaussian

    def spy(shape: tuple[int, ...]) -> Any:
        mask = original(shape)
        drawn.append((mask.first_block, mask.first_block + mask.n_blocks))
        return mask

    offload.masks.gaussian = spy  # type: ignore[method-assign]
    for _ in range(3):
        x = torch.randn(2, 16, requires_grad=True)
        enclave(x).sum().backward()
        offload.forget()
    assert len(drawn) == 3 * (5 + 6)  # per pass: 5 masks and one check vector per ocall
    blocks = [b for start, end in drawn for b in range(start, end)]
    assert len(blocks) == len(set(blocks))  # no keystream block ever served two masks


def test_a_zero_tensor_is_masked_too() -> None:
    _, enclave, recorder, _ = _pair(1.0)
    enclave.c(torch.zeros(2, 24))
    assert float(recorder.seen[0][2].abs().max()) > 0.1


def test_no_ocall_outside_an_enclave_call() -> None:
    _, enclave, _, offload = _pair(1.0)
    offload.ocall = None
    with pytest.raises(RuntimeError, match="outside an enclave call"):
        enclave(torch.randn(2, 16))


def test_the_ree_checks_what_it_is_asked() -> None:
    server = FrozenLinearServer({"w": torch.zeros(3, 4, dtype=torch.float64)})
    good = to_wire(torch.ones(2, 4, dtype=torch.float64))
    _, out = server("linear", {"name": "w"}, {"x": good})
    assert from_wire(out["y"]).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown ocall"):
        server("matmul", {"name": "w"}, {"x": good})
    with pytest.raises(ValueError, match="names no frozen linear"):
        server("linear", {"name": "v"}, {"x": good})
    with pytest.raises(ValueError, match="last dimension 4, weight needs 3"):
        server("linear_t", {"name": "w"}, {"g": good})
    with pytest.raises(ValueError, match="float64 tensor 'x'"):
        server("linear", {"name": "w"}, {"x": torch.ones(2, 4)})


def test_outsourced_layers_keep_the_weights_and_names() -> None:
    plain, enclave, _, _ = _pair(1.0)
    assert isinstance(enclave.a, OutsourcedLinear)
    assert enclave.state_dict().keys() == plain.state_dict().keys()
    assert not any(p.requires_grad for p in enclave.parameters())


@pytest.mark.parametrize("method", ["linear", "linear_t"])
def test_a_tampered_product_is_caught(method: str) -> None:
    _, enclave, recorder, offload = _pair(1e4)

    def cheat(name: str, meta: dict[str, Any], tensors: Tensors) -> tuple[dict, Tensors]:
        out_meta, out = recorder(name, meta, tensors)
        if name != method or meta["name"] != "c":
            return out_meta, out
        y = from_wire(out["y"]).clone()
        # A change of 1e-4 of the row's true scale, hidden under a mask 1e4 times larger.
        y[0, 0] += 1e-4 * float(y.abs().max()) / 1e4
        return out_meta, {"y": to_wire(y)}

    offload.ocall = cheat
    x = torch.randn(4, 16, requires_grad=True)
    with pytest.raises(TamperedResultError, match=f"answer to {method} of c .*Freivalds"):
        enclave(x).sum().backward()


def test_a_wrongly_shaped_answer_is_caught() -> None:
    _, enclave, recorder, offload = _pair(1.0)

    def short(name: str, meta: dict[str, Any], tensors: Tensors) -> tuple[dict, Tensors]:
        out_meta, out = recorder(name, meta, tensors)
        return out_meta, {"y": out["y"][:-1]}

    offload.ocall = short
    with pytest.raises(TamperedResultError, match=r"has shape \(3, 24\), not \(4, 24\)"):
        enclave(torch.randn(4, 16))


def test_layers_sharing_an_input_are_answered_in_one_ocall_from_the_second_pass() -> None:
    plain, enclave, recorder, offload = _pair(1e4)
    calls: list[dict[str, Any]] = []

    def ree(method: str, meta: dict[str, Any], tensors: Tensors) -> tuple[dict, Tensors]:
        calls.append({"method": method, **meta})
        return recorder(method, meta, tensors)

    offload.ocall = ree
    for rounds in range(3):
        calls.clear()
        x = torch.randn(4, 16)
        torch.testing.assert_close(enclave(x), plain(x), rtol=1e-5, atol=1e-6)
        offload.forget()
        first = [{"method": "linear", "name": "a"}, {"method": "linear", "name": "b"}]
        batched = [{"method": "linear", "name": "a", "also": ["b"]}]
        assert calls == (first if rounds == 0 else batched) + [{"method": "linear", "name": "c"}]


def test_the_ree_refuses_a_bad_also() -> None:
    server = FrozenLinearServer(
        {"w": torch.zeros(3, 4, dtype=torch.float64), "v": torch.zeros(5, 2, dtype=torch.float64)}
    )
    x = to_wire(torch.ones(2, 4, dtype=torch.float64))
    _, out = server("linear", {"name": "w", "also": ["w"]}, {"x": x})
    assert set(out) == {"y", "y1"}
    with pytest.raises(ValueError, match="for linear only"):
        server("linear_t", {"name": "w", "also": ["w"]}, {"g": to_wire(torch.ones(2, 3).double())})
    with pytest.raises(ValueError, match="names no frozen linear"):
        server("linear", {"name": "w", "also": ["u"]}, {"x": x})
    with pytest.raises(ValueError, match="ocall linear of v: last dimension 4, weight needs 2"):
        server("linear", {"name": "w", "also": ["v"]}, {"x": x})
