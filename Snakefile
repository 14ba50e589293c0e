from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
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
    figures,


rule all:
    default_target: True
    input:
        rules.figures.input,
