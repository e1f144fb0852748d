"""The remote-code transformers class that `kha-train export` copies into every export no stock
class holds exactly (configuration_kha.py, modeling_kha.py: torch + transformers only)."""
