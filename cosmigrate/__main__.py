"""`python -m cosmigrate` runs the CLI."""

from cosmigrate.cli import main

main()
