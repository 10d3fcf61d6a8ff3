"""The `pagoda` command: `pagoda serve` starts every process; each role can also start alone.

Only this package ties the services together; none of them imports it.
"""
