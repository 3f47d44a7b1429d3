"""After training: `evaluate` answers held-out queries with every policy and judges the answers; `report`
turns evaluations (one run dir or several seeds) into report.md with plots."""
