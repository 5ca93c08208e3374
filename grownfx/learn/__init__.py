"""Learning on the engine: the stage loop, task records, the GROWN learner, the baselines, distributed helpers.

Imports the engine, data, models and the recipe schema; never the runner, the CLI or reports.
"""
