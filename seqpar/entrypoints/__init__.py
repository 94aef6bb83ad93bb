"""The OpenAI-compatible server (`seqpar serve`)."""
