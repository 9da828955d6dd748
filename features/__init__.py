"""Feature definitions: pure functions over polars LazyFrames.

Inputs are internal events (u, i, t: epoch seconds), item tables and candidate pairs
(u, i); outputs are feature columns keyed by (u, i), (u) or (i). Every function is
point-in-time: it sees only the events it is given, which the caller cuts at the cutoff.
"""
