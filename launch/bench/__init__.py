"""The pieces of ``launch/bench.py``: one module per experiment of issue 5, plus shared helpers and the report.

Each experiment module has ``run(context) -> Section`` (measure, and say how) and ``plot(section, path)``.
"""
