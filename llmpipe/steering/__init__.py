"""Steering: a prompt before every chunk (``prompt``), recorded in the archive header."""
