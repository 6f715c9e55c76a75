"""Run configuration: typed sections loaded from YAML, their checks, the objectives' tables."""
