"""Reports against the papers: published numbers, verdicts, tables, the reproduce planner.

docs/results.md describes the verdicts; ``published`` holds the numbers, ``verdict`` the rules,
``tables`` writes the report and ``reproduce`` plans and runs a table's grid.
"""
