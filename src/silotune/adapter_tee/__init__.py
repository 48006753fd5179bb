"""Adapter in the TEE (arXiv 2401.09796): the adapter and its optimizer live only in an enclave."""
