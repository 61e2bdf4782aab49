"""Diagnostics of each stage's product (`samora probe`): linear and k-NN probes, linear CKA, their inputs."""
