"""Renting GPUs for the sweep: the provider-neutral flows (offers and cost, launch, wait, status, watch,
relaunch, budget, destroy) over the `Provider` protocol of `provider.py`, the on-instance code
(`instance.py`, `watchdog.py`), and one module per provider under `providers/`."""
