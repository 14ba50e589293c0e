# Tables, figures and the report, built only from result files: after copying `results/`
# back from a cluster, `snakemake figures --allowed-rules aggregate plot figures` rebuilds
# every table and figure without running a model. Plotting options live in `plots:` (a
# params entry), so changing one reruns only `plot`; `aggregate:` settings likewise.
from specdec.report.figures import FIGURES, LEFT_OUT, TABLES

# Report category of each figure (subcategory: the experiment). "Headline" holds what the
# report's first page shows (workflow/report/workflow.rst includes it).
FIGURE_CATEGORIES = {
    "speedup_vs_gamma": "Headline",
    "speedup_vs_load": "Speedup",
    "speedup_waterfall": "Speedup",
    "speedup_vs_tree_size": "Speedup",
    "throughput_vs_batch": "Speedup",
    "acceptance_per_position": "Acceptance",
    "accepted_per_step": "Acceptance",
    "by_category": "Acceptance",
    "latency_cdf": "Latency",
    "latency_vs_rate": "Latency",
    "energy_per_token": "Energy",
    "energy_vs_speedup": "Energy",
    "power_timeline": "Energy",
}


rule aggregate:
    input:
        results=experiment_runs,
        requests=lambda wildcards: experiment_runs(wildcards, "requests.jsonl"),
    output:
        headline=report(
            f"{RESULTS}/tables/{{experiment}}/headline.html",
            caption="../report/headline.rst",
            category="Headline",
            subcategory="{experiment}",
        ),
        headline_md=f"{RESULTS}/tables/{{experiment}}/headline.md",
        summary=report(
            f"{RESULTS}/tables/{{experiment}}/summary.html",
            caption="../report/summary.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        summary_csv=f"{RESULTS}/tables/{{experiment}}/summary.csv",
        summary_md=f"{RESULTS}/tables/{{experiment}}/summary.md",
        categories=report(
            f"{RESULTS}/tables/{{experiment}}/categories.html",
            caption="../report/categories.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        categories_csv=f"{RESULTS}/tables/{{experiment}}/categories.csv",
        categories_md=f"{RESULTS}/tables/{{experiment}}/categories.md",
        runs=report(
            f"{RESULTS}/tables/{{experiment}}/runs.html",
            caption="../report/runs.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        runs_csv=f"{RESULTS}/tables/{{experiment}}/runs.csv",
        runs_md=f"{RESULTS}/tables/{{experiment}}/runs.md",
        failed=report(
            f"{RESULTS}/tables/{{experiment}}/failed.html",
            caption="../report/failed.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        failed_csv=f"{RESULTS}/tables/{{experiment}}/failed.csv",
        failed_md=f"{RESULTS}/tables/{{experiment}}/failed.md",
        not_supported=report(
            f"{RESULTS}/tables/{{experiment}}/not_supported.html",
            caption="../report/not_supported.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        not_supported_csv=f"{RESULTS}/tables/{{experiment}}/not_supported.csv",
        not_supported_md=f"{RESULTS}/tables/{{experiment}}/not_supported.md",
        break_even=report(
            f"{RESULTS}/tables/{{experiment}}/break_even.html",
            caption="../report/break_even.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        break_even_csv=f"{RESULTS}/tables/{{experiment}}/break_even.csv",
        break_even_md=f"{RESULTS}/tables/{{experiment}}/break_even.md",
        capacity=report(
            f"{RESULTS}/tables/{{experiment}}/capacity.html",
            caption="../report/capacity.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        capacity_csv=f"{RESULTS}/tables/{{experiment}}/capacity.csv",
        capacity_md=f"{RESULTS}/tables/{{experiment}}/capacity.md",
        gamma=report(
            f"{RESULTS}/tables/{{experiment}}/gamma.html",
            caption="../report/gamma.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        gamma_csv=f"{RESULTS}/tables/{{experiment}}/gamma.csv",
        gamma_md=f"{RESULTS}/tables/{{experiment}}/gamma.md",
        trees=report(
            f"{RESULTS}/tables/{{experiment}}/trees.html",
            caption="../report/trees.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        trees_csv=f"{RESULTS}/tables/{{experiment}}/trees.csv",
        trees_md=f"{RESULTS}/tables/{{experiment}}/trees.md",
        tree_size=report(
            f"{RESULTS}/tables/{{experiment}}/tree_size.html",
            caption="../report/tree_size.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        tree_size_csv=f"{RESULTS}/tables/{{experiment}}/tree_size.csv",
        tree_size_md=f"{RESULTS}/tables/{{experiment}}/tree_size.md",
        run_info=report(
            f"{RESULTS}/tables/{{experiment}}/run_info.html",
            caption="../report/run_info.rst",
            category="Run info",
            subcategory="{experiment}",
        ),
        run_info_csv=f"{RESULTS}/tables/{{experiment}}/run_info.csv",
        run_info_md=f"{RESULTS}/tables/{{experiment}}/run_info.md",
        # What the figures draw besides runs and summary.
        requests=f"{RESULTS}/tables/{{experiment}}/requests.csv",
        itl=f"{RESULTS}/tables/{{experiment}}/itl.csv",
        positions=f"{RESULTS}/tables/{{experiment}}/positions.csv",
        tree_sizes=f"{RESULTS}/tables/{{experiment}}/tree_sizes.csv",
        power=f"{RESULTS}/tables/{{experiment}}/power.csv",
    log:
        "logs/report/aggregate_{experiment}.log",
    conda:
        "../../envs/specdec.yaml"
    params:
        settings=config.get("aggregate", {}),
        slo=experiment_slo,
    script:
        "../scripts/aggregate.py"


# Each figure is a folder holding its PNG and SVG, or nothing where the figure has no data:
# the outputs are known before the runs, what has data only after. The report shows the
# pictures it finds, and the first page says which figures were left out and why.
rule plot:
    input:
        **{name: f"{RESULTS}/tables/{{experiment}}/{name}.csv" for name in TABLES},
    output:
        **{
            name: report(
                directory(f"{RESULTS}/figures/{{experiment}}/{name}"),
                patterns=["{figure}.png"],
                caption=f"../report/{name}.rst",
                category=FIGURE_CATEGORIES[name],
                subcategory="{experiment}",
            )
            for name in FIGURES
        },
        left_out=report(
            f"{RESULTS}/figures/{{experiment}}/{LEFT_OUT}",
            caption="../report/left_out.rst",
            category="Headline",
            subcategory="{experiment}",
        ),
    log:
        "logs/report/plot_{experiment}.log",
    conda:
        "../../envs/specdec.yaml"
    params:
        plots=config.get("plots", {}),
    script:
        "../scripts/figures.py"


# Every cell's result is a target too: Snakemake does not rebuild a missing intermediate
# file whose consumers look up to date, so a deleted or killed cell would never rerun and
# the tables would keep numbers whose files are gone.
rule figures:
    input:
        tables=expand(rules.aggregate.output, experiment=experiments()),
        figures=expand(rules.plot.output, experiment=experiments()),
        heads=heads_reports(),
        results=run_results(),


# Experiments that draft with a head the pipeline trained: what the training bought.
rule heads_report:
    input:
        summary=f"{RESULTS}/tables/{{experiment}}/summary.csv",
        runs=f"{RESULTS}/tables/{{experiment}}/runs.csv",
        trainings=experiment_trainings,
    output:
        table=report(
            f"{RESULTS}/tables/{{experiment}}/heads.html",
            caption="../report/heads.rst",
            category="Tables",
            subcategory="{experiment}",
        ),
        csv=f"{RESULTS}/tables/{{experiment}}/heads.csv",
        md=f"{RESULTS}/tables/{{experiment}}/heads.md",
        curve=report(
            directory(f"{RESULTS}/figures/{{experiment}}/training_curve"),
            patterns=["{figure}.png"],
            caption="../report/training_curve.rst",
            category="Acceptance",
            subcategory="{experiment}",
        ),
    log:
        "logs/report/heads_{experiment}.log",
    conda:
        "../../envs/specdec.yaml"
    params:
        heads=experiment_borrowed_heads,
    script:
        "../scripts/heads.py"
