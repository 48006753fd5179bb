"""Datasets: the fortunes corpus and sample, local split files, and partitioning across silos."""
