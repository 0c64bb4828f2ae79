"""Kernel side: fetch a tree, apply the series, merge and validate the config, build."""
