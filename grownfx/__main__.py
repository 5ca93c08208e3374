"""`python -m grownfx ...` runs the command line (grownfx.cli.app)."""

from grownfx.cli.app import main

if __name__ == "__main__":
    main()
