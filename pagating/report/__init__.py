"""`pagating report`: read a sweep's runs from MLflow (read), its statistics (stats), summary.md (markdown,
with the plan-vs-measured table of perf), metrics.json (metrics), the figures (plots); build writes them."""
