"""Performance benchmarks of tokgen: ``python -m benchmarks.run`` (``make bench``); results in BENCHMARKS.md."""
