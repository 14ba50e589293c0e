"""Rule `plot`: the figures of one experiment from its tables."""

import logging
from pathlib import Path

from specdec.report.figures import TABLES, make_figures

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
written = make_figures(
    {name: snakemake.input[name] for name in TABLES},
    Path(snakemake.output.left_out).parent,
    snakemake.params.plots,
)
logging.info("wrote %s", [str(p) for p in written])
