"""Federated fine-tuning: Flower ServerApp/ClientApp, strategies and secure-aggregation stages."""
