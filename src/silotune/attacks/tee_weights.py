"""Adapter in the TEE: the REE recovers the LoRA weights from masked tensors, fresh vs reused masks.

Attacker
    The REE (the untrusted host that computes the frozen matmuls for the enclave).
Observes
    Every tensor the enclave sends it in ``observe_steps`` consecutive training steps that follow
    ``train_steps`` steps (so that the adapter has moved from its initialisation), recorded at the
    ocall boundary by :func:`silotune.adapter_tee.masked_leakage.record_steps`.
Knows in advance
    The public base model and the architecture's code, the job's config (LoRA rank and target
    modules, ``enclave.mask_std``, the tokenizer's pad token).
Attack
    1. *Is a mask shared?* For the shape of the first block's input, the REE stacks every received
       tensor of that shape, each scaled to unit norm. Independent fresh masks are nearly
       orthogonal; one reused mask makes every row point along it. If the top singular value
       holds over half the energy, the mask is shared; otherwise (the product) the received
       tensors are the REE's best estimate of the clear ones and it goes on with them.
    2. *Known plaintext* (shared mask only). The first block's input is ``RMSNorm(embedding)`` of
       the tokens: decode it with the shared direction projected out (as ``tee-masks`` does), then
       for each position keep the candidate token (of the ``CANDIDATES`` nearest) whose implied
       mask leaves the later blocks' RMSNorm outputs (the inputs of ``q_proj``, ``gate_proj``,
       ``lm_head``) at unit RMS. Received minus decoded is then the mask itself, times the first
       tensor's scale, and every tensor of that shape is unmasked by subtracting its own multiple
       of it (the multiple is the tensor's projection on the mask). That also removes the
       tensor's own component along the mask (one scalar per tensor): restored from unit RMS for
       norm outputs, fitted with the weights for ``o_proj``'s input.
    3. *Weight fit, per block.* ``v_proj``'s LoRA delta reaches ``o_proj``'s input linearly,
       ``a_j = P_j h (W_v + dW_v)^T`` for head ``j`` (``P_j`` the attention, ``h`` the block's
       normalised input): least squares for ``dW_v`` with ``P_j`` computed by the public block
       from the recovered ``h``. Then L-BFGS on the deltas of every LoRA target among ``q_proj``,
       ``k_proj``, ``v_proj`` so that the block's own attention code maps ``h`` to ``a``; each
       delta is truncated to rank ``r``. Padding rows (decoded as the pad token) are left out.
Metric
    ``leakage``: cosine similarity between the recovered and the true ``dW = scaling * B A`` of
    each attacked LoRA matrix at each observed step, averaged; also per target module, the
    median relative error ``|dW_hat - dW| / |dW|`` and the cosine of the recovered update
    between consecutive observed steps (the step's change of the adapter, a function of the
    batch's gradient).
Chance
    The mean ``|cosine|`` of random rank-``r`` matrices (Gaussian factors) of the same shapes with
    the true deltas; the zero guess has relative error 1.
Not attacked
    LoRA on ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` or ``lm_head`` (their outputs
    reach the REE only through the residual stream); the backward tensors, which the REE also
    receives, are not used. The numbers are a lower bound on what the REE can recover.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from silotune.adapter_tee.masked_leakage import (
    FIRST_INPUT,
    StepView,
    first_input_table,
    nearest_rows,
    record_steps,
    token_scores,
)
from silotune.attacks.tee_masks import reused_masks, tee_job
from silotune.config import JobConfig, config_from_dict
from silotune.errors import ConfigError

__all__ = ["run_tee_weights", "tee_weight_leakage", "true_deltas", "unmask", "weight_row"]

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj")
CANDIDATES = 10  # tokens tried per position by the known-plaintext decoder
SHARED_ENERGY = 0.5  # top singular value's share of the energy above which a mask is shared
TRAIN_STEPS = 10
OBSERVE_STEPS = 2
REFINE_ITERS = 100
CHANCE_DRAWS = 16

Received = dict[tuple[str, str], torch.Tensor]


def _shared_direction(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The mask direction shared by ``tensors`` (unit vector), or ``None`` if there is none."""
    if len(tensors) < 2:
        return None
    rows = torch.stack([t.flatten().double() / t.double().norm() for t in tensors])  # (N, D)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    return vh[0] if float(s[0] ** 2 / (s**2).sum()) > SHARED_ENERGY else None


def _norm_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """RMSNorm weight in front of each linear whose input is a norm's output, by REE name."""
    base = model.model  # type: ignore[union-attr]
    found = {"lm_head": base.norm.weight}
    for i, block in enumerate(base.layers):
        if i:  # block 0's q_proj input is the known plaintext itself
            found[f"model.layers.{i}.self_attn.q_proj"] = block.input_layernorm.weight
        found[f"model.layers.{i}.mlp.gate_proj"] = block.post_attention_layernorm.weight
    return {k: w.detach().double().abs().clamp_min(1e-6) for k, w in found.items()}


def _consistent_tokens(
    inputs: dict[str, torch.Tensor],
    scores: torch.Tensor,
    table: torch.Tensor,
    norms: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Per position, the candidate token whose implied mask leaves later norm outputs at RMS 1."""
    y0 = inputs[FIRST_INPUT]
    guess = scores.argmax(-1)  # (B, T)
    cand = scores.topk(min(CANDIDATES, scores.shape[-1]), -1).indices  # (B, T, K)
    mask = y0 - table[guess]  # (B, T, C): the scaled mask where the guess is right
    shift = table[cand] - table[guess][..., None, :]  # (B, T, K, C)
    penalty = torch.zeros(cand.shape, dtype=torch.float64)
    for name, weight in norms.items():
        y = inputs.get(name)
        if y is None or y.shape != y0.shape:
            continue
        rho = float((y * mask).sum() / (mask * mask).sum())
        x = (y - rho * mask)[..., None, :] + rho * shift  # (B, T, K, C) per candidate
        penalty += (x / weight).pow(2).mean(-1).sqrt().log().pow(2)
    return cand.gather(-1, penalty.argmin(-1, keepdim=True)).squeeze(-1)


def _restore_along(x: torch.Tensor, along: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x + c * along`` with ``c`` putting every position of ``x / weight`` back at RMS 1.

    Unmasking removes a norm output's component along the mask (one unknown scalar per tensor);
    a few Newton steps on ``sum_p (rms_p^2 - 1)^2`` find it again.
    """
    xs, zs = x / weight, along / weight
    c, size = 0.0, x.shape[-1]
    xx, xz, zz = xs.pow(2).sum(-1) / size, (xs * zs).sum(-1) / size, zs.pow(2).sum(-1) / size
    for _ in range(5):
        q = xx + 2 * c * xz + c * c * zz - 1  # (B, T): rms^2 - 1 per position
        dq = 2 * xz + 2 * c * zz
        grad, hess = float((q * dq).sum()), float((dq * dq + q * 2 * zz).sum())
        if hess <= 0 or not math.isfinite(grad / hess):
            break
        c -= grad / hess
    return x + c * along


def unmask(
    received: Received, model: nn.Module, table: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """The REE's estimate of every forward input, its decoded tokens, and the shared mask's direction.

    ``model`` is the REE's public model; ``table`` its :func:`first_input_table` (float64). The
    direction (unit norm, shaped like the first block's input) is ``None`` for fresh masks.
    """
    inputs = {name: t.double() for (ocall, name), t in received.items() if ocall == "linear"}
    y0 = inputs[FIRST_INPUT]
    u = _shared_direction([t for t in received.values() if t.shape == y0.shape])
    if u is None:  # fresh masks: nothing to strip
        return inputs, nearest_rows(y0, table), None
    flat = y0.flatten()
    stripped = (flat - (flat @ u) * u).reshape(y0.shape)
    scores = stripped @ table.T - 0.5 * (table * table).sum(-1)  # (B, T, V)
    norms = _norm_weights(model)
    guess = _consistent_tokens(inputs, scores, table, norms)
    mask = y0 - table[guess]
    along = mask / mask.norm()
    for name, y in inputs.items():
        if y.shape == y0.shape:
            x = y - float((y * along).sum()) * along
            inputs[name] = _restore_along(x, along, norms[name]) if name in norms else x
    inputs[FIRST_INPUT] = table[guess]
    return inputs, guess, along


def _rank(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def fit_block(
    attn: nn.Module,
    rotary: nn.Module,
    h: torch.Tensor,
    a: torch.Tensor,
    rows: torch.Tensor,
    targets: list[str],
    rank: int,
    iters: int,
    along: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Deltas of ``targets`` (among q/k/v_proj) that make ``attn`` map ``h`` to ``a`` (step 3).

    ``h`` (B, T, C) and ``a`` (B, T, H*d) are the recovered input of ``q_proj`` and of
    ``o_proj``; ``rows`` (B, T) the positions fitted. ``attn`` and ``rotary`` are float64.
    ``along`` is the unit direction along which unmasking lost ``a``'s component (a shared
    mask); that component is fitted too.
    """
    b, t, c = h.shape
    heads, groups = attn.config.num_attention_heads, attn.config.num_key_value_heads
    d = attn.head_dim
    causal = torch.full((t, t), float("-inf"), dtype=h.dtype).triu(1)[None, None]
    extra = {
        "position_embeddings": rotary(h, torch.arange(t)[None]),
        "attention_mask": causal.expand(b, 1, t, t),
    }
    eye = torch.eye(heads * d, dtype=h.dtype)  # o_proj := identity returns o_proj's input

    def attend(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(attn, {"o_proj.weight": eye, **weights}, (h,), extra)[0]
        return out.reshape(b, t, heads, d)

    weight = {n: getattr(attn, n).weight.detach() for n in targets}
    delta = {n: torch.zeros_like(w) for n, w in weight.items()}
    a = a.reshape(b, t, heads, d)
    lost = torch.zeros_like(a) if along is None or along.numel() != a.numel() else along
    lost = lost.reshape(b, t, heads, d)
    with torch.no_grad():
        residual = a - attend({})  # (B, T, H, d): the adapters' part
        if "v_proj" in targets:
            delta["v_proj"] = _least_squares_v(attend, h, residual, lost, rows, groups, attn)
    scale = float(residual[rows].pow(2).mean()) or 1.0
    if iters and math.isfinite(scale):
        shift = torch.zeros((), dtype=h.dtype, requires_grad=True)  # a's lost component
        params = [shift, *(delta[n].requires_grad_(True) for n in targets)]
        opt = torch.optim.LBFGS(
            params, max_iter=iters, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            out = attend({f"{n}.weight": weight[n] + delta[n] for n in targets})
            loss = (out - a - shift * lost)[rows].pow(2).mean() / scale
            loss.backward()
            return loss

        fitted = {n: delta[n].detach().clone() for n in targets}
        opt.step(closure)
        if all(bool(torch.isfinite(delta[n]).all()) for n in targets):
            fitted = {n: delta[n].detach() for n in targets}
        delta = fitted
    return {n: _rank(delta[n], rank) for n in targets}


def _least_squares_v(
    attend: Any,
    h: torch.Tensor,
    residual: torch.Tensor,
    lost: torch.Tensor,
    rows: torch.Tensor,
    groups: int,
    attn: nn.Module,
) -> torch.Tensor:
    """``dW_v`` from ``residual_j = (P_j h) dW_v^T + k lost_j`` per head (``P_j`` from the public
    block, ``k`` the unknown multiple of the component unmasking removed)."""
    c, heads, d = h.shape[-1], residual.shape[2], residual.shape[3]
    chunks = []
    for start in range(0, c, d):  # v_proj := a selector of d input dims gives P_j h[..., dims]
        width = min(d, c - start)
        sel = torch.zeros(groups * d, c, dtype=h.dtype)
        for g in range(groups):
            sel[g * d + torch.arange(width), start + torch.arange(width)] = 1.0
        weights = {"v_proj.weight": sel}
        if getattr(attn.v_proj, "bias", None) is not None:
            weights["v_proj.bias"] = torch.zeros(groups * d, dtype=h.dtype)
        chunks.append(attend(weights)[..., :width])
    ph = torch.cat(chunks, -1)  # (B, T, H, C): P_j h per head
    dv = torch.zeros(groups * d, c, dtype=h.dtype)
    per = heads // groups
    for g in range(groups):  # kv head g serves query heads g*per .. (g+1)*per - 1
        x = torch.cat([ph[:, :, j][rows] for j in range(g * per, (g + 1) * per)])  # (N, C)
        y = torch.cat([residual[:, :, j][rows] for j in range(g * per, (g + 1) * per)])  # (N, d)
        z = torch.cat([lost[:, :, j][rows] for j in range(g * per, (g + 1) * per)])  # (N, d)
        y_off = y - x @ torch.linalg.lstsq(x, y).solution  # what x cannot explain
        z_off = z - x @ torch.linalg.lstsq(x, z).solution
        k = float((y_off * z_off).sum() / (z_off * z_off).sum()) if z_off.norm() > 0 else 0.0
        dv[g * d : (g + 1) * d] = torch.linalg.lstsq(x, y - k * z).solution.T
    return dv


def true_deltas(adapter: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """``scaling * B A`` of every LoRA matrix of a PEFT adapter state, by REE layer name."""
    out = {}
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[name] = scaling * (b.double() @ a.double())
    return out


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    denom = float(x.norm() * y.norm())
    return float((x.flatten() @ y.flatten()) / denom) if denom > 0 else 0.0


def _chance(true: torch.Tensor, rank: int, gen: torch.Generator) -> float:
    draws = []
    for _ in range(CHANCE_DRAWS):
        left = torch.randn(true.shape[0], rank, generator=gen, dtype=torch.float64)
        right = torch.randn(rank, true.shape[1], generator=gen, dtype=torch.float64)
        draws.append(abs(_cos(left @ right, true)))
    return statistics.mean(draws)


def _recover_step(
    view: StepView,
    model: nn.Module,
    table: torch.Tensor,
    pad_id: int,
    names: list[str],
    rank: int,
    iters: int,
) -> tuple[dict[str, torch.Tensor], float]:
    """Recovered deltas of ``names`` at one observed step, and the decoder's token recovery."""
    inputs, guess, along = unmask(view.received, model, table)
    rows = guess != pad_id  # the REE's own estimate of the real positions
    base = model.model  # type: ignore[union-attr]
    found: dict[str, torch.Tensor] = {}
    for i, block in enumerate(base.layers):
        prefix = f"model.layers.{i}.self_attn."
        targets = [n for n in ATTENTION_TARGETS if prefix + n in names]
        if not targets:
            continue
        h, a = inputs[prefix + "q_proj"], inputs[prefix + "o_proj"]
        deltas = fit_block(
            block.self_attn, base.rotary_emb, h, a, rows, targets, rank, iters, along
        )
        found.update({prefix + n: dw for n, dw in deltas.items()})
    return found, token_scores(guess, view.batch)[0]


def tee_weight_leakage(
    cfg_dict: dict[str, Any],
    mask_std: float,
    reuse: bool,
    train_steps: int = TRAIN_STEPS,
    observe_steps: int = OBSERVE_STEPS,
    refine_iters: int = REFINE_ITERS,
) -> dict[str, Any]:
    """LoRA-weight recovery by the REE at ``mask_std``, with fresh or reused masks (see module)."""
    cfg = config_from_dict(cfg_dict)
    clock = time.perf_counter()
    with reused_masks() if reuse else contextlib.nullcontext():
        views, ree = record_steps(
            cfg_dict, mask_std, train_steps + observe_steps, record_from=train_steps
        )
    observe_s = time.perf_counter() - clock
    clock = time.perf_counter()
    scaling = cfg.adapter.lora_alpha / cfg.adapter.r
    truths = [true_deltas(v.adapter, scaling) for v in views]
    names = sorted(n for n in truths[0] if n.rsplit(".", 1)[-1] in ATTENTION_TARGETS)
    if not names:
        raise ConfigError(
            "attack 'tee-weights' recovers LoRA on q_proj, k_proj or v_proj; the job's "
            f"adapter targets {sorted({n.rsplit('.', 1)[-1] for n in truths[0]})}"
        )
    model = ree.model.double()
    table = first_input_table(model)
    pad_id = int(ree.tokenizer.pad_token_id)
    found, tokens = [], []
    for view in views:
        deltas, hits = _recover_step(view, model, table, pad_id, names, cfg.adapter.r, refine_iters)
        found.append(deltas)
        tokens.append(hits)
    gen = torch.Generator().manual_seed(0)
    pairs = list(zip(found, truths, strict=True))
    cosines = {n: [_cos(f[n], t[n]) for f, t in pairs] for n in names}
    errors = {n: [float((f[n] - t[n]).norm() / t[n].norm()) for f, t in pairs] for n in names}
    updates = [
        _cos(f1[n] - f0[n], t1[n] - t0[n])
        for (f0, t0), (f1, t1) in zip(pairs, pairs[1:], strict=False)
        for n in names
    ]

    def pooled(values: dict[str, list[float]], target: str = "") -> list[float]:
        return [v for n, vs in values.items() if n.endswith(target) for v in vs]

    targets = [t for t in ATTENTION_TARGETS if any(n.endswith(t) for n in names)]
    return {
        "leakage": statistics.mean(pooled(cosines)),
        "chance": statistics.mean(_chance(truths[-1][n], cfg.adapter.r, gen) for n in names),
        "by_target": {
            t: {
                "cosine": statistics.mean(pooled(cosines, t)),
                "relative_error": statistics.median(pooled(errors, t)),
            }
            for t in targets
        },
        "relative_error": statistics.median(pooled(errors)),
        "update_cosine": statistics.mean(updates) if updates else None,
        "token_recovery": statistics.mean(tokens),
        "unattacked": sorted(set(truths[0]) - set(names)),
        "cost": {"observe_s": observe_s, "attack_s": time.perf_counter() - clock},
    }


def weight_row(
    cfg_dict: dict[str, Any], model: str, mask_std: float, reuse: bool
) -> dict[str, Any]:
    """One result row (``setting``, ``leakage``, ``chance``, ``cost``, ...) at the defaults."""
    setting = {"model": model, "mask_std": mask_std, "reused_mask": reuse,
               "train_steps": TRAIN_STEPS, "observe_steps": OBSERVE_STEPS}  # fmt: skip
    return {"setting": setting, **tee_weight_leakage(cfg_dict, mask_std, reuse)}


def run_tee_weights(cfg: JobConfig, mask_stds: tuple[float, ...] = (1.0, 1e4)) -> dict[str, Any]:
    """Result rows for ``silotune attack tee-weights``: fresh and reused masks at each std."""
    job = tee_job(cfg)
    rows = [
        weight_row(job, cfg.model.name, mask_std, reuse)
        for mask_std in mask_stds
        for reuse in (False, True)
    ]
    return {"rows": rows}
