"""What people look at: recall tables for one run, paper-layout tables across runs, and
visuals (grids, heat-maps, plots)."""
