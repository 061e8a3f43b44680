"""Benchmarks of the gmtrouter service (``make bench``)."""
