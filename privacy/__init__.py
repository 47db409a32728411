"""Privacy: secure aggregation (SecAgg+-style), differential privacy, key handling."""
