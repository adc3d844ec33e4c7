"""Converters from the official checkpoints to nl_plugin's parameter layout."""
