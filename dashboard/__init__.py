"""The live dashboard (Dash + Plotly) of a machine and its measurements, served by ``twinioc web``."""
