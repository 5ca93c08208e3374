"""Reports for people: run and comparison tables in the paper's formats, plots, progress display.

Reads run folders; imports nothing above data.
"""
