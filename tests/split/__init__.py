"""Tests for silotune.split."""
