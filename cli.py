"""`python cli.py ...` is `wsseg ...` from a checkout."""
from wsseg.cli import main

main()
