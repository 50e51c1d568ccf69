"""Data stage: the raw corpora (corpora), tokenize + pack (prepare), the packed dataset training reads
(dataset), DVC read without dvc (dvc), and the `pagating data` / `pagating prepare` verbs (cli)."""
