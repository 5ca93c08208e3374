"""`python -m grownfx ...` runs the command line (cli.app)."""

from cli.app import main

if __name__ == "__main__":
    main()
