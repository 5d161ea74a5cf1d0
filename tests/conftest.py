"""Tests that start Ray in this process bind it to 127.0.0.1: Ray reads the variable once, at its first
import, so it is set here, before any test module imports ray."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
