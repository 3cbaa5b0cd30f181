"""The pieces of ``launch/bench.py``: one module per experiment of issue 5 (``run(context) -> Section``: measure, and
fill its section's prose, ``sections.md``; ``plot(section, path)``), the shared harness (``common``), the analytic byte
counts (``formulas``), the figures' helpers (``plots``) and the report.
"""
