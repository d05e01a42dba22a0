"""Layer importance metrics (hook-based: `similarity.py`)."""
