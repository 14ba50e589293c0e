"""Rule `heads_report`: what training each head bought, from its training record and the
experiment's summary."""

import logging
from pathlib import Path

import pandas as pd

from specdec.records import read_training
from specdec.report.heads import write_heads

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
trainings = {
    Path(path).parent.name: read_training(path) for path in snakemake.input.trainings
}
written = write_heads(
    trainings,
    pd.read_csv(snakemake.input.summary),
    pd.read_csv(snakemake.input.runs),
    Path(snakemake.output.csv).with_suffix(""),
    snakemake.output.curve,
    snakemake.wildcards.experiment,
    snakemake.params.heads,
)
logging.info("wrote %s", [str(p) for p in written])
