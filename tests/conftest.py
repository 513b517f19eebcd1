"""Shared test setup."""
import os

# Set before torch loads OpenMP (see pipelines/cli.py): tests run beside subprocesses they start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
