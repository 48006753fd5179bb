"""Training: the shared local-step loop and the centralized reference trainer."""
