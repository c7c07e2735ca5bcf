"""Pure figure builders, one module per page: plain data in, `plotly.graph_objects.Figure`
out. Each builder validates its input, extracts plain rows, and builds the figure from those
rows only; empty data gives a figure that says so, never an error. `common` holds what every
page draws alike (the empty figure, attempts as separate traces with their boundaries, the
step or wall-clock axis)."""
