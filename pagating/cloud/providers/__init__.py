"""One module per GPU provider: its client (pagating.cloud.provider.Provider) and nothing else."""
