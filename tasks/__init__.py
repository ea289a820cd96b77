"""Thin Prefect task wrappers over :mod:`poisonguard.stages` (no business logic here)."""
