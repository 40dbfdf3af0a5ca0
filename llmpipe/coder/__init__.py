"""Entropy coding: integer frequency tables and the range coder that consumes them."""
