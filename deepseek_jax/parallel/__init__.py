"""SPMD machinery that knows no model: the mesh, the one logical-axis rules table, expert-parallel dispatch."""
