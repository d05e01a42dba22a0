"""Measuring plans: perplexity, the zero-shot task suite (lm-eval's scoring), samples, speed; intervals and
paired differences (`stats`); several plans side by side, resumable (`compare`); tables (`table`)."""
