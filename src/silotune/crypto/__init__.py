"""Torch-free cryptography: identities, handshake, AEAD frames, PRG masks, Shamir shares, CKKS."""
