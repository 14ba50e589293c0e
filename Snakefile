import os

from snakemake.utils import min_version

import specdec.gate.config

min_version("9.0")

# The gate's first step: each config file through our YAML reader, whose errors name the file,
# line and column of a syntax mistake or of a key given twice (Snakemake's name neither).
for configfile_path in [
    *workflow.configfiles,
    *filter(os.path.exists, ["config.yaml"]),
]:
    specdec.gate.config.read_yaml(configfile_path)


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/heads.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/report.smk"


# Only benchmark jobs go to a cluster; the rest is cheap and runs where Snakemake runs.
localrules:
    all,
    cell,
    choose_kernels,
    prepare_model,
    prepare_dataset,
    aggregate,
    plot,
    heads_report,
    figures,


rule all:
    default_target: True
    input:
        rules.figures.input,
