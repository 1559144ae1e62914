"""Fault-injection suite (issue 4): real Redis, real workers, real faults."""
