"""Built-in verifiable tasks for post-training (post-training.md §6)."""
