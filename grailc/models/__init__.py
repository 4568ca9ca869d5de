"""Trained reference models shipped with grailc."""
