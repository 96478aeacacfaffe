"""Side-by-side benchmark of vaultflow against restic and borg.

Owns the reference data sets, the measured scenarios, and the reports under bench/results/; run it via bench/run.
"""
