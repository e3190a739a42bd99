"""`python -m popbox` runs the `popbox` command."""

from popbox.cli import main

main()
