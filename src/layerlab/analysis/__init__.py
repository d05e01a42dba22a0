"""Looking inside: attention maps and spectra, the logit lens, hidden-state cosine, and their plots."""
