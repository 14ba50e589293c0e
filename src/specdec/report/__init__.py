"""The report: results read back into tidy tables, statistics, theory, sweeps and figures."""
