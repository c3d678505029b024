"""Training, tuning and comparison commands."""
