"""pagating: GPT-2 with paGating units, swept and tracked (MLflow), versioned (DVC), rented (Vast.ai)."""

__version__ = "0.1.0"
