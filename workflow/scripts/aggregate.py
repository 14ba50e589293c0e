"""Rule `aggregate`: the tables of one experiment from its result files."""

import logging
from pathlib import Path

from specdec.report.aggregate import aggregate_experiment
from specdec.report.goodput import Slo

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
written = aggregate_experiment(
    snakemake.input.results,
    Path(snakemake.output.summary_csv).parent,
    snakemake.wildcards.experiment,
    slo=Slo.from_config(snakemake.params.slo),
    **snakemake.params.settings,
)
logging.info("wrote %s", [str(p) for paths in written.values() for p in paths])
