"""Micro-benchmarks of the engine's own kernels (developer tools, not `seqpar bench`): unlike the rest
of seqpar_bench they call internal modules (seqpar.layers) on purpose, to time one kernel alone."""
