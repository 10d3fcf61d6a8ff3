"""`python -m pagoda <subcommand>`: how `pagoda serve` starts each member process."""

from pagoda.cli.main import main

if __name__ == "__main__":
    main()
