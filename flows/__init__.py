"""Prefect flows: nightly sanitize-and-train, and on-call remediation."""
