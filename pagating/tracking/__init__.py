"""MLflow for pagating, one idea per module: store (server, client, retry, UI links), provenance (git,
source, dataset, note, run file), spool (metrics that survive outages), checkpoints (marker, upload,
download), claim (one process per config), finish (the drain at a run's end) and callback (the Trainer's).

Callers import the submodule they need (`from pagating.tracking import store`); nothing is re-exported here.
Nothing in this package imports a module above it (model, run, train, sweep, report, cloud).
"""
