"""Benchmarks, each run as a script (``make bench``, ``bench/memory.py``, ``bench/device_big_model.py``)."""
