"""Privacy attacks: what each party of a silotune job can infer from what it observes.

One module per attack; :data:`ATTACKS` names the ones ``silotune attack NAME CONFIG`` and
``silotune bench privacy`` run. Every attack's docstring states the attacker, exactly what it
observes (taken from the protocol path by :mod:`~silotune.attacks.observe`), what it knows in
advance, the metric and the chance baseline; docs/privacy.md has the measured numbers.
"""

from __future__ import annotations

# name -> (description, runner in silotune.attacks.run)
ATTACKS: dict[str, str] = {
    "split-nearest": "coordinator maps each head activation to the nearest public-head token row",
    "split-learned": "coordinator decodes head activations with an inverter trained on public text",
    "split-labels": "coordinator infers class labels from the tail's gradients (public tail)",
    "split-ciphertext": "enclave host runs the nearest-row attack on the ciphertext it relays",
    "tee-masks": "adapter-in-TEE REE decodes tokens from masked inputs, fresh vs reused masks",
    "tee-weights": "adapter-in-TEE REE recovers the LoRA weights (cosine), fresh vs reused masks",
    "federated-mia": "coordinator tells a silo's training texts from held-out ones (loss, LiRA)",
}

# Attacks whose leakage is a score, not a rate (printed as a number rather than a percentage).
SCORES = {"tee-weights": "cosine", "federated-mia": "AUC"}


def format_leakage(name: str, value: float) -> str:
    """``value`` as its attack reports it: a percentage, or a score such as a cosine or AUC."""
    return f"{value:.3f}" if name in SCORES else f"{value:.1%}"
