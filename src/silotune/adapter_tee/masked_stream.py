"""One-time Gaussian masks from a keyed AES-256-CTR stream whose block counter only moves forward.

The enclave that outsources linear work to the untrusted REE hides every tensor it sends with an
additive mask drawn here. The key is made inside the enclave (``os.urandom``) and never leaves it;
the stream is AES-256-CTR under a key derived from it with :func:`silotune.crypto.prg.derive_key`.
Each mask consumes a block range ``[start, start + n)`` of that stream and moves the counter past
it, so two masks never share a keystream block: reuse is impossible by construction, and asking
for a block below the counter raises :class:`MaskReuseError` rather than returning old keystream.

Uniform 32-bit words become float64 standard normal values by the Box-Muller transform (the
stream's two halves give the cosine and sine branches), so a mask is ``scale * z`` with
``z ~ N(0, 1)`` elementwise; its unblinding factor through a linear map ``W`` is ``scale * (W z)``.
No mask element is ever exactly zero: ``u = (k + 1/2) / 2**32`` lies strictly inside (0, 1), so
the radius is at least ``2**-16`` and the angle never hits a zero of cosine or sine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from silotune.crypto.prg import SEED_BYTES, derive_key
from silotune.errors import MaskReuseError

__all__ = ["BLOCK_BYTES", "Mask", "MaskReuseError", "MaskStream"]

BLOCK_BYTES = 16  # one AES block; the CTR counter counts these
MASK_LABEL = b"silotune/adapter-tee/mask"
_COUNTER_LIMIT = 1 << 64  # far below the 2**128 counter space; a stream never gets near it
_INV_2_32 = 1.0 / (1 << 32)


@dataclass(frozen=True)
class Mask:
    """A standard-normal mask and the keystream blocks it was drawn from.

    Attributes
    ----------
    first_block, n_blocks
        The AES-CTR block range ``[first_block, first_block + n_blocks)`` the mask consumed.
    z
        The mask values, float64, standard normal elementwise, of the shape asked for.
    """

    first_block: int
    n_blocks: int
    z: torch.Tensor


class MaskStream:
    """Draws fresh one-time masks; never the same keystream block twice.

    Parameters
    ----------
    seed
        32 bytes of key material; ``None`` (the default, and what the enclave uses) draws it from
        ``os.urandom``, so no one outside the enclave ever knows it. Tests pass a fixed seed.
    """

    def __init__(self, seed: bytes | None = None) -> None:
        material = os.urandom(SEED_BYTES) if seed is None else seed
        self._key = derive_key(material, label=MASK_LABEL)
        self._next_block = 0
        self.masks_drawn = 0

    @property
    def next_block(self) -> int:
        """The first block no mask has used yet; it only increases."""
        return self._next_block

    def keystream(self, first_block: int, n_bytes: int) -> bytes:
        """Return ``n_bytes`` of keystream starting at ``first_block`` and consume those blocks.

        Raises
        ------
        MaskReuseError
            If ``first_block`` is below :attr:`next_block` (some of it was handed out before).
        ValueError
            If ``n_bytes`` is negative or the range would pass the stream's counter limit.
        """
        if first_block < self._next_block:
            raise MaskReuseError(
                f"keystream block {first_block} was already used (the counter is at "
                f"{self._next_block}); a one-time mask is never drawn twice"
            )
        if n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
        n_blocks = -(-n_bytes // BLOCK_BYTES)
        if first_block + n_blocks > _COUNTER_LIMIT:
            raise ValueError("the mask stream is exhausted; start a new enclave session")
        # Move the counter before producing anything, so a failure below cannot hand out the
        # same blocks again on a retry.
        self._next_block = first_block + n_blocks
        iv = first_block.to_bytes(BLOCK_BYTES, "big")
        encryptor = Cipher(algorithms.AES(self._key), modes.CTR(iv)).encryptor()
        return encryptor.update(bytes(n_blocks * BLOCK_BYTES))[:n_bytes]

    def gaussian(self, shape: torch.Size | tuple[int, ...]) -> Mask:
        """Draw a fresh float64 standard-normal mask of ``shape`` from unused keystream."""
        n = math.prod(shape)
        half = -(-n // 2)  # Box-Muller turns each (u1, u2) pair into two normal values
        first = self._next_block
        stream = self.keystream(first, 8 * half)
        words = np.frombuffer(stream, dtype="<u4").astype(np.float64)
        # (k + 0.5) / 2**32 is exact in float64 and lies strictly inside (0, 1).
        uniform = (torch.from_numpy(words) + 0.5) * _INV_2_32
        u1, u2 = uniform[:half], uniform[half:]
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        z = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:n]
        self.masks_drawn += 1
        return Mask(first, self._next_block - first, z.reshape(shape))
