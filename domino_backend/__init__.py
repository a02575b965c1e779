"""Domino speculative decoding engine."""
