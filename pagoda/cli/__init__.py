"""The `pagoda` subcommands, one module per group, gathered by `pagoda.cli.main`."""
