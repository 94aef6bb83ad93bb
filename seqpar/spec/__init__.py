"""Speculative decoding on rank 0: proposers (ngram.py: prompt lookup; draft.py: a draft model),
and the Speculator (speculator.py) that the engine asks for each decoding sequence's drafts, tells
what the target accepted, and that keeps the statistics and the back-off rule."""
