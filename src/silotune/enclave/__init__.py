"""Trusted execution: enclave interface, simulated backend, attestation, sealing."""
