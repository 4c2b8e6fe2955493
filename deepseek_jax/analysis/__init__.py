"""Facts computed from shapes and compiled programs: parameter counts, FLOPs, layout reports."""
