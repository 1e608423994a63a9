"""Goodput / goodput-per-dollar simulator for memory-heterogeneous PD clusters (issue 8).

Data flow: data/*.json -> config (models, devices, prices) -> roofline (step costs) + memory (pool
capacity) + transfer (KV link) -> systems (a ClusterSpec) -> cluster.simulate (event replay of a
trace) -> search (goodput, P:D under a budget). validate.py calibrates on the CPU testbed.
See README.md in this folder.
"""
