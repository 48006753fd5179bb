"""The settings a silo and the coordinator must share in split mode, compared when a silo joins.

Each side runs its own half of one model with one adapter, so both halves must be cut from the
same architecture at the same layers and carry the same adapter; otherwise the job trains nonsense
or saves an adapter that plain PEFT cannot load (a silo at ``adapter.r`` 16 against a coordinator at
8 once saved an adapter declaring rank 16 that held rank-8 trunk tensors). :func:`shared_settings`
reads those settings from a side's built PEFT model and its job, by the config keys a user sets:

==========================  ===============================================================
key                         why both sides need it
==========================  ===============================================================
model                       architecture from the model's config (type, layers, widths,
                            vocabulary): the trunk's inputs are the head's outputs
train.seed                  only for presets whose weights are drawn from it (tiny-llama)
adapter.type                LoRA or prefix: the saved adapter's kind
adapter.r, adapter.alpha,   LoRA rank, scale and targets as PEFT resolved them (defaults
adapter.target_modules      included): the tensors' shapes and names in the saved adapter
adapter.spf.enabled,        SPF + LoRA, and the ratios that choose the SPF rows: the deltas'
adapter.spf.head_ratio,     shapes, the averaged vector, and the saved spf_deltas file
adapter.spf.ffn_ratio
adapter.num_virtual_tokens  prefix length: the prefix's shape, and the positions of the tokens
split.head_layers,          where the model is cut
split.tail_layers
data.task                   what the tail's loss means
split.activation_dtype      the dtype of activations and gradients on the wire
split.secure_averaging      how silo adapters are averaged (and split.secagg_clip with masking:
                            the fixed-point scale every silo encodes with)
split.sync_every            the steps at which every silo meets to average
==========================  ===============================================================

The base model's weights are not compared (a digest of them would make a silo read the trunk's
weights, which it never loads); nor is anything a side chooses for itself (data, learning rate,
noise, server mode, addresses, keys).

At join the silo sends its settings and their :func:`settings_digest` in the ``join`` frame; the
coordinator answers with its own, and each side compares: a difference refuses the silo before
its first step, with one sentence naming every differing key and both values. The settings travel
as JSON inside the authenticated, encrypted session, like every frame's meta.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from silotune.models.presets import PRESETS
from silotune.transport.frames import FrameError

if TYPE_CHECKING:
    from peft import PeftModel

    from silotune.config import JobConfig

__all__ = [
    "differences",
    "mismatch_message",
    "read_settings",
    "settings_digest",
    "shared_settings",
]

MAX_SETTINGS = 64  # keys a peer's settings may hold (ours hold about 15)
_SHOWN_CHARS = 80  # a value longer than this is cut in messages


def _architecture(config: Any) -> str:
    """One line naming what makes two halves of a model fit together."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return (
        f"{config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{heads} heads ({kv_heads} key/value), vocab {config.vocab_size}"
    )


def shared_settings(cfg: JobConfig, model: PeftModel) -> dict[str, Any]:
    """The settings both sides of a split job must share, read from ``cfg`` and its built model.

    ``model`` is this side's PEFT model (:func:`~silotune.split.parts.build_half`): the adapter's
    rank, alpha, targets and prefix length are taken as PEFT resolved them, so a default on one
    side and the same value spelled out on the other agree.
    """
    peft_config: Any = model.peft_config[model.active_adapter]
    settings: dict[str, Any] = {"model": _architecture(model.config)}
    preset = PRESETS.get(cfg.model.name)
    if preset is not None and preset.seeded:
        settings["train.seed"] = cfg.train.seed
    settings["adapter.type"] = cfg.adapter.type
    if cfg.adapter.type == "lora":
        targets = peft_config.target_modules
        settings["adapter.r"] = int(peft_config.r)
        settings["adapter.alpha"] = float(peft_config.lora_alpha)
        settings["adapter.target_modules"] = (
            targets if isinstance(targets, str) else sorted(targets)
        )
        spf = cfg.adapter.spf
        settings["adapter.spf.enabled"] = spf.enabled
        if spf.enabled:  # the rows each side trains, and so the averaged vector's layout
            settings["adapter.spf.head_ratio"] = spf.head_ratio
            settings["adapter.spf.ffn_ratio"] = spf.ffn_ratio
    else:
        settings["adapter.num_virtual_tokens"] = int(peft_config.num_virtual_tokens)
    s = cfg.split
    settings.update(
        {
            "split.head_layers": s.head_layers,
            "split.tail_layers": s.tail_layers,
            "data.task": cfg.data.task,
            "split.activation_dtype": s.activation_dtype,
            "split.secure_averaging": s.secure_averaging,
            "split.sync_every": s.sync_every,
        }
    )
    if s.secure_averaging == "masking":
        settings["split.secagg_clip"] = s.secagg_clip
    return settings


def settings_digest(settings: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the settings as canonical JSON: equal digests mean equal settings."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_settings(meta: Mapping[str, Any], frame: str) -> dict[str, Any]:
    """The peer's settings from a ``join`` frame's meta, checked against its digest.

    Raises
    ------
    FrameError
        If ``settings`` is missing or not a small JSON object, or ``digest`` does not match it.
    """
    settings = meta.get("settings")
    if not isinstance(settings, dict) or not settings or len(settings) > MAX_SETTINGS:
        raise FrameError(
            f"the {frame} frame must carry 'settings', an object of 1..{MAX_SETTINGS} job "
            "settings (a silotune from before split settings were agreed at join?)"
        )
    if meta.get("digest") != settings_digest(settings):
        raise FrameError(f"the {frame} frame's settings do not match its 'digest'")
    return settings


def differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, our value, their value)`` for every key whose values differ (None: not set)."""
    return [
        (key, ours.get(key), theirs.get(key))
        for key in sorted(ours.keys() | theirs.keys())
        if ours.get(key) != theirs.get(key)
    ]


def _shown(value: Any) -> str:
    text = "(not set)" if value is None else json.dumps(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def mismatch_message(silo: Mapping[str, Any], coordinator: Mapping[str, Any]) -> str:
    """Every differing key with the silo's and the coordinator's value, in one line."""
    return "; ".join(
        f"{key} silo {_shown(mine)}, coordinator {_shown(theirs)}"
        for key, mine, theirs in differences(silo, coordinator)
    )
