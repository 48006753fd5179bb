"""Split learning: U-shaped slicing, the frames silos and the trunk exchange, and their sessions."""
