"""Looking inside: plots of importance scores and layer similarity."""
