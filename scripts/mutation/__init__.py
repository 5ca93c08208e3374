"""Mutation testing for grownfx: `python -m scripts.mutation --help`, and docs/testing.md ("Mutation testing").

mutants.py   the operators: find every mutant of a file on its ast, apply it as a text edit
tree.py      the project's files, copies of them, the lines a change touched
covmap.py    which tests reach which line (coverage.py, one context per test), cached
execute.py   run one mutant in a worker's copy against the tests that reach it
report.py    the equivalents file; the markdown and JSON report
cli.py       the command line
"""
