"""Calibration and training windows mixed from several texts.

A linear patch fitted on one domain fits that domain: calibrated on WikiText-2 valid alone, a patch of
SmolLM2 minus 6 layers lowered WikiText-2 test perplexity (68.6 -> 39.9) but raised a novel's
(58.6 -> 64.1); mixed from WikiText-2 valid, *Pride and Prejudice* and *Frankenstein* it lowered both
(issue 19). So recovery calibrates on a mix by default (`settings.CALIBRATION_MIX`), split evenly over the texts.
"""

from __future__ import annotations

from .corpora import read_text
from .errors import LayerlabError
from .evaluate.perplexity import Window, bos_id, encode_text, make_windows


class CalibrationError(LayerlabError):
    """Calibration text that cannot give the windows asked for."""


def mixed_windows(tokenizer, sources: tuple[str, ...], ctx: int, tokens: int | None) -> list[Window]:
    """Non-overlapping windows of `ctx` tokens (BOS first, as perplexity scores them), interleaved over `sources`.

    With a token budget each text gives its first `tokens // (ctx * len(sources))` windows (a text too short
    for its share is an error); with `tokens=None` every window of every text.
    """
    if not sources:
        raise CalibrationError("no calibration text given; name at least one (e.g. wikitext2-valid)")
    share = None if tokens is None else tokens // (ctx * len(sources))
    if share == 0:
        raise CalibrationError(f"a budget of {tokens} tokens gives none of the {len(sources)} calibration texts a "
                               f"window of {ctx} tokens; raise it to at least {ctx * len(sources)}")
    per_text = []
    for source in sources:
        ids = encode_text(tokenizer, read_text(source))
        windows = make_windows(ids, ctx, None, bos_id(tokenizer), llama_cpp=False)
        if not windows or share is not None and len(windows) < share:
            raise CalibrationError(f"calibration text {source} has {len(ids)} tokens, fewer than the "
                                   f"{max(share or 1, 1)} windows of {ctx} it must give; lower the token budget "
                                   "or the context, or use a longer text")
        per_text.append(windows[:share])
    longest = max(len(w) for w in per_text)
    return [windows[i] for i in range(longest) for windows in per_text if i < len(windows)]
