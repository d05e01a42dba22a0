"""Measuring plans: sample generations (more metrics arrive with the evaluation issue)."""
