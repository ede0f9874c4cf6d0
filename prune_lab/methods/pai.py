"""Pruning-at-initialization methods (SNIP, GraSP, SynFlow): registered here."""
