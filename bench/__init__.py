"""`pagoda bench`: the benchmarks behind every performance figure of the project."""
