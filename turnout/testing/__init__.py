"""Support for the end-to-end tests and the benchmarks: real Turnout processes on loopback."""
