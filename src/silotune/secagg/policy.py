"""What a silo accepts, from its own config: the coordinator can ask for more, never for less."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.errors import PolicyError

__all__ = ["Method", "PolicyError", "SiloPolicy", "Weighting"]

Method = Literal["none", "masking", "he"]
Weighting = Literal["examples", "equal"]


@dataclass(frozen=True)
class SiloPolicy:
    """A silo's floor for secure aggregation (``federation`` or ``split`` keys of its own config).

    Parameters
    ----------
    method
        The aggregation this silo's config names; it sends its update in no other way.
    min_silos
        Fewest silos whose updates may be summed in one aggregate this silo contributes to.
    clip
        The fixed-point clip every silo of the job uses.
    weighting
        ``examples`` (FedAvg by signed example counts) or ``equal``.
    max_examples
        Most examples one silo may claim (bounds any one silo's weight); larger claims are refused.
    authenticated
        Peers' keys must be signed by enrolled identities (false only with
        ``allow_unauthenticated: true``, which logs a warning every round).
    """

    method: Method
    min_silos: int
    clip: float
    weighting: Weighting = "examples"
    max_examples: int = 1_000_000
    authenticated: bool = True

    def __post_init__(self) -> None:
        if self.min_silos < 2 and self.method != "none":
            raise ValueError("secure aggregation needs min_silos >= 2")
        if self.weighting not in ("examples", "equal"):
            raise ValueError(f"weighting must be 'examples' or 'equal', got {self.weighting!r}")

    def require(self, requested: str) -> None:
        """Refuse (before anything leaves the silo) a request for another aggregation method."""
        if requested != self.method and self.method != "none":
            raise PolicyError(
                f"the coordinator asked for secure aggregation {requested!r}, but this silo's "
                f"config demands {self.method!r}; refusing to send its update"
            )

    def check_examples(self, examples: int, who: str) -> None:
        """A claimed example count must be in [1, max_examples]."""
        if not 1 <= examples <= self.max_examples:
            raise PolicyError(
                f"{who} claims {examples} training examples; allowed 1..{self.max_examples} "
                "(federation.max_examples): its weight would dominate the aggregate"
            )

    def weight(self, own: int, counts: list[int]) -> float:
        """This silo's pre-weight over the round's silos (``counts`` includes ``own``)."""
        if self.weighting == "equal":
            return 1.0 / len(counts)
        return own / sum(counts)
