"""Tests for silotune.transport."""
