"""Suites: run a test suite on booted kernels and read its results (scenarios, JUnit, reports)."""
