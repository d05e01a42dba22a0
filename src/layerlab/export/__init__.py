"""Physically smaller models built from plans."""
